"""Dense and MoE `HookedTransformerConfig`s with equal active parameters, named presets, and
parameter counts.

The MoE's expert width is the dense MLP width divided by `experts_per_token`, so a token passes
through as many MLP weights in either model (top-2 of 8 experts, each half as wide, by default).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformer_lens import HookedTransformerConfig

from crossdiff.plumbing.common import CrossdiffError


@dataclass(frozen=True)
class Preset:
    """A named pair of model shapes plus the training defaults that fit them."""

    description: str
    model: dict[str, Any]  # HookedTransformerConfig fields shared by both models
    d_mlp: int  # the dense MLP width; each expert is d_mlp // experts_per_token wide
    num_experts: int
    experts_per_token: int
    training: dict[str, Any] = field(default_factory=dict)


_SHARED = dict(
    n_layers=5,
    act_fn="silu",
    gated_mlp=True,
    normalization_type="RMS",
    positional_embedding_type="standard",
    default_prepend_bos=False,  # crossdiff's token rows already start with BOS
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        description="trains on a 2-core CPU in minutes; d_model 128, vocab 4096",
        model=_SHARED | dict(d_model=128, n_heads=4, d_head=32, n_ctx=256, d_vocab=4096),
        d_mlp=512,
        num_experts=8,
        experts_per_token=2,
        # measured on the embedded corpus: every held-out gap to unigram >= 1.3 nats
        training=dict(
            steps=500,
            batch_size=8,
            lr=6e-3,
            warmup=30,
            eval_every=100,
            checkpoint_every=100,
        ),
    ),
    # a pair sized for `crossdiff run --preset small --controls --crosscoder-seeds 3` (four models,
    # nine crosscoders) in about an hour on a 2-core CPU (measured: docs/findings.md)
    "small": Preset(
        description="a 2-core CPU in about 10 minutes per pair; d_model 256, vocab 4096",
        model=_SHARED | dict(d_model=256, n_heads=4, d_head=64, n_ctx=256, d_vocab=4096),
        d_mlp=1024,
        num_experts=8,
        experts_per_token=2,
        training=dict(
            steps=1200,
            batch_size=8,
            lr=3e-3,
            warmup=60,
            eval_every=200,
            checkpoint_every=200,
        ),
    ),
    "paper": Preset(
        description="the seed paper's scale (GPU): d_model 768, GPT-2 vocabulary 50257",
        model=_SHARED | dict(d_model=768, n_heads=12, d_head=64, n_ctx=1024, d_vocab=50257),
        d_mlp=3072,
        num_experts=8,
        experts_per_token=2,
        training=dict(
            steps=40_000,
            batch_size=64,
            lr=6e-4,
            warmup=1000,
            eval_every=1000,
            checkpoint_every=1000,
        ),
    ),
}

_NORMALIZATIONS = (None, "LN", "LNPre", "RMS", "RMSPre")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise CrossdiffError(
            f"unknown model preset {name!r}; the known presets are {sorted(PRESETS)}. "
            "Pick one of them, or pass overrides (e.g. d_model=256) to dense_config/moe_config."
        )
    return PRESETS[name]


def dense_config(preset: str = "tiny", **overrides: Any) -> HookedTransformerConfig:
    """The dense model of `preset`; any HookedTransformerConfig field can be overridden."""
    for key in ("num_experts", "experts_per_token"):
        if overrides.get(key) is not None:
            raise CrossdiffError(
                f"dense_config got {key}={overrides[key]!r}, but a dense model has no experts; "
                "use moe_config for a Mixture-of-Experts model"
            )
    p = get_preset(preset)
    fields = p.model | dict(d_mlp=p.d_mlp, model_name=f"crossdiff-{preset}-dense") | overrides
    return _make_config(fields, overrides)


def moe_config(preset: str = "tiny", **overrides: Any) -> HookedTransformerConfig:
    """The MoE model of `preset`. Unless `d_mlp` (the expert width) is given, it is the dense
    width divided by `experts_per_token`, which keeps active MLP parameters equal."""
    p = get_preset(preset)
    fields = p.model | dict(
        num_experts=p.num_experts,
        experts_per_token=p.experts_per_token,
        model_name=f"crossdiff-{preset}-moe",
    )
    fields |= overrides
    _check_experts(fields)
    if "d_mlp" not in overrides:
        fields["d_mlp"] = max(1, p.d_mlp // fields["experts_per_token"])
    return _make_config(fields, overrides)


def matched_configs(
    preset: str = "tiny", **overrides: Any
) -> tuple[HookedTransformerConfig, HookedTransformerConfig]:
    """(dense, moe) with equal active MLP parameters. `d_mlp` here is the dense width; the MoE's
    experts get d_mlp // experts_per_token. Expert settings apply to the MoE only."""
    moe_only = {k: overrides.pop(k) for k in ("num_experts", "experts_per_token") if k in overrides}
    dense = dense_config(preset, **overrides)
    moe_overrides = overrides | moe_only
    if "d_mlp" in overrides:
        base = get_preset(preset)
        k = moe_only.get("experts_per_token", base.experts_per_token)
        n = moe_only.get("num_experts", base.num_experts)
        _check_experts(dict(num_experts=n, experts_per_token=k))
        moe_overrides["d_mlp"] = max(1, overrides["d_mlp"] // k)
    return dense, moe_config(preset, **moe_overrides)


def _check_experts(fields: dict[str, Any]) -> None:
    n, k = fields.get("num_experts"), fields.get("experts_per_token")
    if not isinstance(n, int) or n < 1:
        raise CrossdiffError(f"num_experts must be a positive integer, got {n!r}")
    if not isinstance(k, int) or k < 1:
        raise CrossdiffError(f"experts_per_token must be a positive integer, got {k!r}")
    if k > n:
        raise CrossdiffError(
            f"experts_per_token={k} is larger than num_experts={n}: a token cannot be routed to "
            f"more experts than exist; use experts_per_token <= {n}"
        )


def _make_config(fields: dict[str, Any], overrides: dict[str, Any]) -> HookedTransformerConfig:
    fields = dict(fields)
    if "d_model" in overrides and "d_head" not in overrides:
        d_model, n_heads = fields["d_model"], fields["n_heads"]
        if not isinstance(d_model, int) or not isinstance(n_heads, int) or d_model % n_heads:
            raise CrossdiffError(
                f"d_model={d_model!r} is not a multiple of n_heads={n_heads!r}; "
                "choose them so that d_model % n_heads == 0, or pass d_head explicitly"
            )
        fields["d_head"] = d_model // n_heads
    for key in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab"):
        value = fields.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CrossdiffError(f"{key} must be a positive integer, got {value!r}")
    if fields.get("normalization_type") not in _NORMALIZATIONS:
        raise CrossdiffError(
            f"normalization_type={fields.get('normalization_type')!r} is not supported; "
            f"expected one of {list(_NORMALIZATIONS)}"
        )
    if fields.get("num_experts") is not None:
        _check_experts(fields)
    if isinstance(fields.get("dtype"), str):
        from crossdiff.plumbing.common import resolve_dtype

        fields["dtype"] = resolve_dtype(fields["dtype"])
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CrossdiffError(
            f"{unknown} are not HookedTransformerConfig fields; check the spelling "
            "(e.g. d_model, n_layers, n_heads, d_mlp, d_vocab, n_ctx, num_experts)"
        )
    try:
        return HookedTransformerConfig(**fields)
    except (AssertionError, ValueError) as err:
        raise CrossdiffError(f"impossible model config {overrides or fields}: {err}") from err


def count_parameters(cfg: HookedTransformerConfig) -> dict[str, int]:
    """Parameter counts of the model `cfg` describes, measured on a weightless ("meta") copy.

    Keys: total, active (what one token passes through: all but the unselected experts),
    embedding (token + positional), unembedding, attention, norm, mlp_total, mlp_active, router
    (the MoE's gate; included in mlp_*), and non_embedding_active (active minus (un)embedding).
    """
    from transformer_lens import HookedTransformer

    meta_cfg = dataclasses.replace(cfg, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.device("meta"):
            model = HookedTransformer(meta_cfg, move_to_device=False)
    counts = dict.fromkeys(
        ("embedding", "unembedding", "attention", "norm", "mlp_total", "router", "experts"), 0
    )
    for name, param in model.named_parameters():
        n = param.numel()
        if name.startswith(("embed.", "pos_embed.")):
            counts["embedding"] += n
        elif name.startswith("unembed."):
            counts["unembedding"] += n
        elif ".attn." in name:
            counts["attention"] += n
        elif ".mlp." in name:
            counts["mlp_total"] += n
            if ".mlp.experts." in name:
                counts["experts"] += n
            elif ".mlp.W_gate" in name and cfg.num_experts:
                counts["router"] += n
        else:
            counts["norm"] += n
    inactive = 0
    if cfg.num_experts:
        inactive = counts["experts"] * (cfg.num_experts - cfg.experts_per_token) // cfg.num_experts
    total = sum(counts[k] for k in ("embedding", "unembedding", "attention", "norm", "mlp_total"))
    counts.pop("experts")
    return {
        "total": total,
        "active": total - inactive,
        **counts,
        "mlp_active": counts["mlp_total"] - inactive,
        "non_embedding_active": total - inactive - counts["embedding"] - counts["unembedding"],
    }
