"""The checks and choices diff_features makes before its pass over the tokens: the options, the
crosscoder's decoder against the activations, the direction (A, B), and whether the two models
share one activation basis."""

from __future__ import annotations

from typing import Any

import torch

from crossdiff.analysis.source import TokenSource
from crossdiff.crosscoder.metrics import check_zero_padding
from crossdiff.plumbing.common import CrossdiffError


def resolve_direction(
    direction: tuple[str, str] | None, model_names: tuple[str, ...]
) -> tuple[int, int]:
    if direction is None:
        if len(model_names) >= 2 and {"dense", "moe"} <= set(model_names):
            return model_names.index("dense"), model_names.index("moe")
        return 0, 1
    a, b = direction
    missing = [n for n in (a, b) if n not in model_names]
    if missing or a == b:
        raise CrossdiffError(
            f"direction {direction!r} must name two different models of {model_names}; "
            f"e.g. direction=({model_names[0]!r}, {model_names[1]!r})"
        )
    return model_names.index(a), model_names.index(b)


def cosine_reason(same_basis: bool, inferred: str, shared_decoder: str) -> str:
    if same_basis:
        return f"the two models' vectors live in one basis ({inferred}), so cosines are meaningful"
    tied = (
        " (this crosscoder's tied designated decoders do not change that: they force one vector "
        "on two unrelated spaces)"
        if shared_decoder == "tied"
        else ""
    )
    return (
        f"the models are treated as trained independently ({inferred}), so their activation "
        f"bases are unrelated{tied} and a cosine between their decoder vectors means nothing; it "
        "is reported only for completeness"
    )


def check_options(
    n_top_contexts: int, context_window: int, batch_size: int, min_expert_firings: int
) -> None:
    if n_top_contexts < 1 or context_window < 0 or batch_size < 1:
        raise CrossdiffError(
            "n_top_contexts and batch_size must be >= 1 and context_window >= 0; got "
            f"{n_top_contexts}, {batch_size}, {context_window}"
        )
    if min_expert_firings < 1:
        raise CrossdiffError(
            f"min_expert_firings must be >= 1, got {min_expert_firings}; 20 is the default"
        )


def checked_decoder(cc: Any, source: TokenSource) -> torch.Tensor:
    """cc.W_dec [d_sae, n_models, d_model], checked against the activations' models and width."""
    w_dec = cc.W_dec.detach()
    if w_dec.ndim != 3:
        raise CrossdiffError(
            f"cc.W_dec must be [d_sae, n_models, d_model], got shape {tuple(w_dec.shape)}; is this "
            "a crossdiff CrossCoder?"
        )
    _, n_models_cc, d_model = w_dec.shape
    if n_models_cc != source.n_models:
        raise CrossdiffError(
            f"the crosscoder reads {n_models_cc} models but the activations have "
            f"{source.n_models}; use the store the crosscoder was trained on"
        )
    if n_models_cc < 2:
        raise CrossdiffError("a feature diff needs a crosscoder over at least 2 models")
    probe = source.read_acts(0, 1)
    if probe.shape[-1] != d_model:
        raise CrossdiffError(
            f"the crosscoder has d_model {d_model} but the activations have width "
            f"{probe.shape[-1]}; use the store the crosscoder was trained on"
        )
    return w_dec


def choose_basis(same_basis: bool | None) -> tuple[bool, str]:
    """(same_basis, why): False unless the caller says otherwise."""
    if same_basis is None:
        reason = (
            "same_basis=False, the default; pass same_basis=True only for two checkpoints of "
            "one model"
        )
        return False, reason
    return bool(same_basis), f"same_basis={bool(same_basis)} set by the caller"


def checked_widths(
    cfg: Any, d_model: int, n_models: int, same_basis: bool, acts_or_store: Any
) -> tuple[int, ...]:
    widths = tuple(getattr(cfg, "widths", None) or (d_model,) * n_models)
    if same_basis and len(set(widths)) > 1:
        raise CrossdiffError(
            f"same_basis=True but the models have different widths {list(widths)}: their "
            "activations cannot share one basis; leave same_basis out"
        )
    if len(set(widths)) > 1 and isinstance(acts_or_store, torch.Tensor):
        check_zero_padding(acts_or_store, cfg)
    return widths
