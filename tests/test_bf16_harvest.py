"""Harvest with the models' forward passes in bfloat16 (the CUDA default), run on the CPU's
bfloat16 autocast: the same store as float32 within bfloat16 rounding."""

from __future__ import annotations

import pytest
import torch

from crossdiff.activations import harvest
from crossdiff.models import build_model, dense_config, moe_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _models():
    overrides = dict(d_model=64, n_heads=2, d_head=32, n_ctx=64, d_vocab=512, seed=3)
    torch.manual_seed(3)
    dense = build_model(dense_config("tiny", d_mlp=128, **overrides))
    moe = build_model(moe_config("tiny", d_mlp=128, **overrides))
    return dense.eval(), moe.eval()


def _tokens(n_seq: int = 16, seq_len: int = 33) -> torch.Tensor:
    tokens = torch.randint(1, 512, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    return tokens


def test_bf16_models_give_the_fp32_store_within_bf16_rounding(tmp_path):
    torch.set_num_threads(1)
    dense, moe = _models()
    tokens = _tokens()
    kwargs = dict(dtype="float32", batch_size=8, progress=False, device="cpu")
    fp32 = harvest(dense, moe, tokens, "paper", tmp_path / "fp32", **kwargs)
    bf16 = harvest(dense, moe, tokens, "paper", tmp_path / "bf16", model_dtype="bfloat16", **kwargs)
    assert fp32.manifest["model_dtype"] == "float32"  # the CPU default
    assert bf16.manifest["model_dtype"] == "bfloat16"
    a, b = fp32.read_acts(), bf16.read_acts()
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (16 * 32, 2, 64)
    error = (b - a).norm(dim=-1) / a.norm(dim=-1)  # [tokens, models]
    # bfloat16 keeps 8 mantissa bits (relative 2**-9 a rounding) over three blocks of matmuls:
    # measured median 0.011 (dense) and 0.007 (MoE), dense max 0.020
    assert error.median() < 2e-2
    assert error[:, 0].max() < 3e-2
    # an MoE token whose top-2 experts flip in some block (near-tied router scores) moves more
    # (measured: 6% of tokens over 0.05, max 0.26); the rest stays within rounding
    assert (error[:, 1] > 5e-2).float().mean() < 0.1
    assert error.median() > 1e-4  # it really ran in bfloat16, not float32
    # the routing is the same for all but a few near-tied tokens
    agree = (fp32.read_metadata()["experts"] == bf16.read_metadata()["experts"]).all(-1)
    assert agree.float().mean() > 0.95
