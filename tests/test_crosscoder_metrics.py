"""FVE = 1 - SSE / SS about the mean, both summed over the whole set, per model."""

import pytest
import torch

from crossdiff.crosscoder import CrossCoder, CrossCoderConfig, evaluate_crosscoder
from crossdiff.crosscoder.metrics import ReconstructionMeter


def direct_fve(x, x_hat):
    sse = (x_hat - x).pow(2).sum(dim=(0, 2))
    sst = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    return 1 - sse / sst


def test_fve_accumulates_over_the_set_and_differs_from_the_flawed_variants():
    g = torch.Generator().manual_seed(0)
    # a large mean offset and token norms that vary 100x: both flawed variants go wrong here
    scale = torch.logspace(-1, 1, 1000)[:, None, None]
    x = (torch.randn(1000, 2, 16, generator=g) * scale + 5.0).double()
    x_hat = x + 2.0 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    meter = ReconstructionMeter(2, 16)
    for chunk in range(0, 1000, 64):  # uneven chunks
        meter.update(x[chunk : chunk + 64], x_hat[chunk : chunk + 64])
    ours = torch.tensor(meter.fve_per_model(), dtype=torch.float64)
    torch.testing.assert_close(ours, direct_fve(x, x_hat), rtol=1e-9, atol=1e-9)
    pooled = 1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert meter.fve() == pytest.approx(float(pooled), abs=1e-9)

    err = (x_hat - x).pow(2).sum(-1)
    per_token_average = (1 - err / (x - x.mean(0)).pow(2).sum(-1)).mean(0)
    about_zero = 1 - err.sum(0) / x.pow(2).sum(dim=(0, 2))
    assert (ours - per_token_average).abs().min() > 0.05
    assert (about_zero - ours).min() > 0.05  # variance about zero inflates FVE
    expected_mse = err.sum(0) / (1000 * 16)
    torch.testing.assert_close(
        torch.tensor(meter.mse_per_model(), dtype=torch.float64), expected_mse
    )


def test_evaluate_crosscoder_matches_a_direct_computation():
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(d_model=8, d_sae=32, k=3))
    with torch.no_grad():
        cc.b_dec.normal_()
        cc.threshold.fill_(0.02)
    x = torch.randn(300, 2, 8) * 2 + 1
    metrics = evaluate_crosscoder(cc, x, batch_size=37)
    with torch.no_grad():
        f = cc.encode(x)
        x_hat = cc.decode(f)
    expected = direct_fve(x.double(), x_hat.double())
    assert metrics["fve_per_model"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert metrics["l0"] == pytest.approx(float((f > 0).sum(-1).float().mean()))
    assert metrics["dead_fraction"] == pytest.approx(float(((f > 0).sum(0) == 0).float().mean()))
    assert metrics["n_tokens"] == 300
    assert evaluate_crosscoder(cc, x, max_tokens=100)["n_tokens"] == 100
