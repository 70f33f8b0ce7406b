"""Model configs, presets and parameter counts."""

import pytest
import torch

from crossdiff.models import (
    PRESETS,
    build_model,
    count_parameters,
    dense_config,
    matched_configs,
    moe_config,
)
from crossdiff.plumbing.common import CrossdiffError

SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_vocab=64, n_ctx=16, device="cpu")


def test_tiny_preset_defaults_match_the_paper_design():
    dense, moe = matched_configs("tiny")
    for cfg in (dense, moe):
        assert cfg.n_layers == 5
        assert cfg.gated_mlp and cfg.act_fn == "silu"
        assert cfg.d_model in (128, 256)
        assert cfg.d_vocab == 4096
    assert dense.num_experts is None
    assert (moe.num_experts, moe.experts_per_token) == (8, 2)
    assert moe.d_mlp * 2 == dense.d_mlp


def test_paper_preset_is_the_seed_papers_scale():
    dense, moe = matched_configs("paper")
    assert (dense.n_layers, dense.d_model, dense.d_vocab) == (5, 768, 50257)
    assert moe.d_mlp == dense.d_mlp // 2


def test_active_mlp_parameters_are_matched_up_to_the_router():
    dense, moe = matched_configs("tiny")
    d, m = count_parameters(dense), count_parameters(moe)
    assert m["router"] == moe.n_layers * moe.d_model * moe.num_experts
    # the dense MLP has biases (b_in, b_out), the experts none: equal up to router and biases
    dense_bias = dense.n_layers * (dense.d_mlp + dense.d_model)
    assert m["mlp_active"] - m["router"] == d["mlp_active"] - dense_bias
    assert m["total"] > 2 * d["total"] > d["total"] == d["active"]
    assert abs(m["active"] - d["active"]) / d["active"] < 0.01
    assert m["embedding"] == d["embedding"] and m["attention"] == d["attention"]


@pytest.mark.parametrize("moe", [False, True])
def test_count_parameters_agrees_with_a_built_model(moe):
    cfg = moe_config("tiny", **SMALL, num_experts=4) if moe else dense_config("tiny", **SMALL)
    counts = count_parameters(cfg)
    model = build_model(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    keys = ("embedding", "unembedding", "attention", "norm", "mlp_total")
    assert sum(counts[k] for k in keys) == counts["total"]
    if moe:
        expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
        inactive = cfg.n_layers * (cfg.num_experts - cfg.experts_per_token) * expert
        assert counts["active"] == counts["total"] - inactive


def test_overrides_apply_and_d_head_follows_d_model():
    cfg = dense_config("tiny", d_model=256, d_vocab=1000)
    assert (cfg.d_model, cfg.d_head, cfg.n_heads, cfg.d_vocab) == (256, 64, 4, 1000)
    dense, moe = matched_configs("tiny", d_mlp=300, experts_per_token=3, num_experts=6)
    assert dense.d_mlp == 300 and dense.num_experts is None
    assert (moe.d_mlp, moe.experts_per_token, moe.num_experts) == (100, 3, 6)
    assert moe_config("tiny", d_mlp=77).d_mlp == 77  # explicit expert width wins


def test_more_experts_per_token_than_experts_is_an_error():
    with pytest.raises(CrossdiffError, match="experts_per_token=9 is larger than num_experts=8"):
        moe_config("tiny", experts_per_token=9)
    with pytest.raises(CrossdiffError, match="experts_per_token"):
        matched_configs("tiny", num_experts=2, experts_per_token=3)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        CrossdiffError, match=r"unknown model preset 'huge'.*\['paper', 'small', 'tiny'\]"
    ):
        dense_config("huge")
    assert set(PRESETS) == {"tiny", "small", "paper"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=130), "not a multiple of n_heads"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(d_vocab=-3), "d_vocab must be a positive integer"),
        (dict(normalisation_type="RMS"), "not HookedTransformerConfig fields"),
        (dict(normalization_type="BN"), "normalization_type='BN' is not supported"),
        (dict(act_fn="nope"), "impossible model config"),
    ],
)
def test_impossible_configs_are_explained(overrides, message):
    with pytest.raises(CrossdiffError, match=message):
        dense_config("tiny", **overrides)


def test_dense_config_refuses_experts():
    with pytest.raises(CrossdiffError, match="use moe_config"):
        dense_config("tiny", num_experts=8)


def test_dtype_may_be_given_by_name():
    assert dense_config("tiny", dtype="bfloat16").dtype == torch.bfloat16


def test_matched_configs_with_only_a_dense_width_keeps_the_presets_experts():
    """d_mlp alone must not be checked against a default of one expert (it is the preset's 8)."""
    dense, moe = matched_configs("tiny", d_mlp=1024)
    assert dense.d_mlp == 1024
    assert (moe.num_experts, moe.experts_per_token, moe.d_mlp) == (8, 2, 512)
