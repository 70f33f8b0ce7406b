"""The MoE's grouped-matmul path (CUDA, bfloat16) checked on the CPU implementation of torch's
grouped_mm: same outputs and gradients as the expert modules within bfloat16 rounding, an expert
with no tokens included; on the CPU the layer never dispatches to it."""

from __future__ import annotations

import pytest
import torch

from crossdiff.models import build_model, moe_config
from crossdiff.models import grouped_mm as gm
from crossdiff.models.moe import moe_modules

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _layer():
    torch.manual_seed(0)
    cfg = moe_config("tiny", d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=64, n_ctx=16)
    return moe_modules(build_model(cfg))[0]


def _routing(n_tokens: int, top_k: int, n_experts: int):
    g = torch.Generator().manual_seed(1)
    # expert 3 gets no slot: an empty group
    choices = torch.tensor([e for e in range(n_experts) if e != 3])
    picks = torch.stack([choices[torch.randperm(len(choices), generator=g)[:top_k]]
                         for _ in range(n_tokens)])  # fmt: skip
    slot_experts = picks.reshape(-1)
    order = torch.argsort(slot_experts, stable=True)
    counts = torch.bincount(slot_experts, minlength=n_experts)
    return order, counts


@pytest.mark.skipif(gm._grouped_mm is None, reason="this torch has no grouped_mm")
def test_grouped_swiglu_equals_the_expert_modules_in_bf16():
    layer = _layer()
    n_tokens, k = 40, layer.experts_per_token
    order, counts = _routing(n_tokens, k, layer.num_experts)
    assert counts[3] == 0
    x = torch.randn(n_tokens, 32, generator=torch.Generator().manual_seed(2))
    weights = [w.weight for e in layer.experts for w in (e.W_gate, e.W_in, e.W_out)]
    stacked = [torch.stack(ws).detach().requires_grad_() for ws in gm_kinds(weights)]

    x1 = x.clone().requires_grad_()
    out = gm.grouped_swiglu(x1, order, counts, k, *stacked)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out.float() * grad_out).sum().backward()

    x2 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = layer._run_expert_modules(x2, order, counts)
    (ref.float() * grad_out).sum().backward()

    assert out.dtype == torch.bfloat16 and out.shape == (n_tokens * k, 32)
    scale = ref.float().abs().max()
    assert (out.float() - ref.float()).abs().max() < 2e-2 * scale  # bf16: 8 mantissa bits
    assert torch.allclose(x1.grad, x2.grad, atol=2e-2 * x2.grad.abs().max())
    ref_w = [w.grad for w in weights]
    for mine, theirs in zip(stacked, gm_kinds(ref_w), strict=True):
        theirs = torch.stack([t if t is not None else torch.zeros_like(mine[0]) for t in theirs])
        assert torch.allclose(mine.grad, theirs, atol=2e-2 * theirs.abs().max())
    assert mine.grad[3].abs().max() == 0  # the empty expert gets no gradient


def gm_kinds(weights):
    return weights[0::3], weights[1::3], weights[2::3]


def test_cpu_layer_never_dispatches_to_it():
    layer = _layer()
    x = torch.randn(2, 5, 32)
    assert not gm.grouped_mm_usable(x, torch.bfloat16, 32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gm.grouped_mm_usable(x, torch.float32, 32, 64)
    order, counts = _routing(10, 2, layer.num_experts)
    weights = [w.weight for e in layer.experts for w in (e.W_gate, e.W_in, e.W_out)]
    assert layer._grouped_mm_experts(x.reshape(10, 32), order, counts, weights) is None


def test_a_refusing_kernel_falls_back_once(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("grouped gemm is not supported on this device")

    monkeypatch.setattr(gm, "_grouped_mm", refuse)
    monkeypatch.setattr(gm, "_failed", [])
    order, counts = _routing(4, 2, 8)
    w = torch.zeros(8, 16, 8)
    with pytest.warns(RuntimeWarning, match="one by one"):
        assert gm.try_grouped_swiglu(torch.zeros(4, 8), order, counts, 2, w, w, w.mT) is None
    assert gm._failed  # and grouped_mm_usable now says no
    assert not gm.grouped_mm_usable(torch.zeros(1, 8), torch.bfloat16, 8, 16)
