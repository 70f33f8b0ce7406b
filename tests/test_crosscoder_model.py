"""The crosscoder: config checks, BatchTopK selection, threshold encode, folding, save/load."""

import json
import subprocess
import sys

import pytest
import torch
from sae_lens import SAE

from crossdiff.crosscoder import CrossCoder, CrossCoderConfig, evaluate_crosscoder, train_crosscoder
from crossdiff.plumbing.common import CrossdiffError

pytestmark = pytest.mark.usefixtures("one_thread")


def random_crosscoder(seed=0, d_model=8, d_sae=32, k=3, **kw) -> CrossCoder:
    torch.manual_seed(seed)
    cc = CrossCoder(CrossCoderConfig(d_model=d_model, d_sae=d_sae, k=k, **kw))
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_(0, 0.5)
        cc.W_dec_untied.mul_(torch.rand(cc.W_dec_untied.shape[:2])[..., None] * 10)
        cc.threshold.fill_(0.05)
    return cc


def test_config_derives_d_in_and_rejects_bad_values():
    cfg = CrossCoderConfig(d_model=8, d_sae=16, k=2)
    assert cfg.d_in == 16 and cfg.n_models == 2 and cfg.architecture() == "crossdiff.crosscoder"
    bad = [
        ({"d_model": 8, "d_sae": 16, "k": 2, "n_shared": 16}, "n_shared=16"),
        ({"d_model": 8, "d_sae": 16, "k": 17}, "k=17"),
        ({"d_model": 8, "d_sae": 16, "k": 2, "shared_decoder": "half"}, "shared_decoder"),
        ({"d_model": 8, "d_sae": 16, "k": 2, "d_in": 8}, "d_in=8"),
        ({"d_model": 8, "d_sae": 16, "k": 2, "n_models": 1}, "n_models=1"),
        ({"d_sae": 16, "k": 2}, "d_model"),
        ({"d_model": 8, "d_sae": 16, "k": 2, "shared_penalty_ratio": 0}, "shared_penalty_ratio"),
    ]
    for kwargs, message in bad:
        with pytest.raises(CrossdiffError, match=message):
            CrossCoderConfig(**kwargs)


def test_wrong_input_shapes_are_refused():
    cc = random_crosscoder()
    for shape in [(4, 3, 8), (4, 2, 7)]:
        with pytest.raises(CrossdiffError, match=r"expected \[batch, n_models=2, d_model=8\]"):
            cc.encode(torch.randn(shape))
    for shape in [(40, 16), (40, 3, 8)]:
        with pytest.raises(CrossdiffError, match=r"n_models=2, d_model=8"):
            evaluate_crosscoder(cc, torch.randn(shape))
        with pytest.raises(CrossdiffError, match=r"n_models=2, d_model=8"):
            train_crosscoder(torch.randn(shape), cc.cfg, steps=1, batch_size=8)
    with pytest.raises(CrossdiffError, match="latents have shape"):
        cc.decode(torch.randn(4, 31))


def test_threshold_encode_does_not_depend_on_the_batch():
    cc = random_crosscoder()
    x = torch.randn(16, 2, 8) * 3
    f = cc.encode(x)
    assert 0 < (f > 0).sum() < f.numel()  # the check below is not trivially true
    for i in (0, 7, 15):
        torch.testing.assert_close(cc.encode(x[i : i + 1]), f[i : i + 1])
    # and it is exactly "score above threshold" with score = ReLU(pre) * sum_m ||W_dec[i, m]||
    pre = (x - cc.b_dec).flatten(1) @ cc.W_enc.reshape(16, 32) + cc.b_enc
    score = pre.relu() * cc.W_dec.norm(dim=-1).sum(-1)
    torch.testing.assert_close(f, torch.where(score > 0.05, pre.relu(), 0.0))


def test_batch_topk_l0_counts_tokens_not_token_model_pairs():
    cc = random_crosscoder(k=3)
    x = torch.randn(10, 2, 8) * 3
    f = cc.encode_topk(x)
    assert int((f > 0).sum()) == 30  # k * batch, over [batch, d_sae] latents
    assert evaluate_crosscoder(cc, x, batch_size=10)["l0_topk"] == pytest.approx(3.0)


def test_selection_prefers_the_larger_summed_decoder_norm():
    cc = random_crosscoder(d_sae=4, k=1)
    with torch.no_grad():
        cc.b_dec.zero_()
        cc.b_enc.zero_()
        cc.W_enc.zero_()
        cc.W_enc[0, 0, :] = 1.0  # every latent has the same pre-activation
        cc.W_dec_untied.fill_(0.1)
        cc.W_dec_untied[2, 1] *= 5  # latent 2: larger norm in model B only
    x = torch.zeros(1, 2, 8)
    x[0, 0, 0] = 1.0
    f = cc.encode_topk(x)
    assert f.nonzero().tolist() == [[0, 2]]


def test_shared_penalty_ratio_scales_shared_scores_and_their_selection():
    def shared_fraction(ratio: float) -> float:
        cc = random_crosscoder(seed=3, d_sae=32, k=4, n_shared=16, shared_penalty_ratio=ratio)
        base = random_crosscoder(seed=3, d_sae=32, k=4, n_shared=16, shared_penalty_ratio=1.0)
        weights, base_weights = cc.selection_weights(), base.selection_weights()
        torch.testing.assert_close(weights[:16], base_weights[:16] / ratio)
        torch.testing.assert_close(weights[16:], base_weights[16:])
        f = cc.encode_topk(torch.randn(256, 2, 8, generator=torch.Generator().manual_seed(0)))
        return float((f[:, :16] > 0).sum() / (f > 0).sum())

    cheap, neutral, dear = shared_fraction(0.5), shared_fraction(1.0), shared_fraction(2.0)
    assert cheap > neutral + 0.05 and neutral > dear + 0.05


@pytest.mark.parametrize("mode", ["free", "tied"])
def test_folding_scaling_factors_preserves_latents_and_reconstructions(mode):
    cc = random_crosscoder(n_shared=8, shared_decoder=mode)
    x = torch.randn(64, 2, 8) * torch.tensor([2.0, 0.25])[None, :, None] + 1.0
    c = torch.tensor([0.5, 4.0])
    f_scaled = cc.encode(x * c[None, :, None])
    recon_scaled = cc.decode(f_scaled)
    assert 0 < (f_scaled > 0).sum() < f_scaled.numel()
    cc.fold_scaling_factors(c)
    f_raw = cc.encode(x)
    torch.testing.assert_close(f_raw, f_scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        cc.decode(f_raw), recon_scaled / c[None, :, None], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(cc.scaling_factors, c)


def test_tied_shared_latents_have_one_decoder_vector():
    cc = random_crosscoder(n_shared=8, shared_decoder="tied")
    assert cc.W_dec_tied.shape == (8, 8) and cc.W_dec_untied.shape == (24, 2, 8)
    cc.fold_scaling_factors(torch.tensor([1.0, 3.0]))
    W = cc.W_dec
    assert W.shape == (32, 2, 8)
    torch.testing.assert_close(W[:8, 0], W[:8, 1] * 3.0)  # one vector in training units
    norms = cc.decoder_norms()
    torch.testing.assert_close(norms[:8, 0], norms[:8, 1])
    assert not torch.allclose(norms[8:, 0], norms[8:, 1])


def test_save_and_load_reconstruct_identically(tmp_path):
    cc = random_crosscoder(n_shared=4, shared_decoder="tied")
    cc.fold_scaling_factors(torch.tensor([2.0, 0.5]))
    cc.save(tmp_path / "cc")
    assert sorted(p.name for p in (tmp_path / "cc").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
        "sae_weights.safetensors.sha256",
    ]
    cfg_json = json.loads((tmp_path / "cc" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "crossdiff.crosscoder"
    x = torch.randn(32, 2, 8) * 2
    expected = cc(x)
    for loaded in (CrossCoder.load(tmp_path / "cc"), SAE.load_from_disk(tmp_path / "cc")):
        assert isinstance(loaded, CrossCoder)
        assert loaded.cfg.n_shared == 4 and loaded.cfg.shared_decoder == "tied"
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    with pytest.raises(CrossdiffError, match="not a saved crosscoder"):
        CrossCoder.load(tmp_path)


@pytest.mark.slow  # 6-12 s: a fresh interpreter imports torch and SAELens
def test_import_crossdiff_lets_saelens_load_a_crosscoder(tmp_path):
    cc = random_crosscoder()
    cc.save(tmp_path)
    code = (
        "import sys, crossdiff; from sae_lens import SAE; "
        f"m = SAE.load_from_disk({str(tmp_path)!r}); print(type(m).__name__, m.cfg.d_sae)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["CrossCoder", "32"]
