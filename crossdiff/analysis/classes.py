"""Latent classes from decoder norms: relative norm, split thresholds, decoder cosine."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.plumbing.common import CrossdiffError

# name -> (lo, hi): r < lo is A-only, r > hi is B-only, lo <= r <= hi is shared.
SPLITS: dict[str, tuple[float, float]] = {
    "paper": (0.3, 0.7),  # the seed paper and Kissane et al.
    "anchors": (0.1, 0.9),  # Minder, Dumas et al.
}

DESIGNATED = "designated-shared"
SHARED = "shared"
DEAD = "dead"


def resolve_split(split: str | tuple[float, float]) -> tuple[str, float, float]:
    """('paper' | 'anchors' | (lo, hi)) -> (name, lo, hi)."""
    if isinstance(split, str):
        if split not in SPLITS:
            raise CrossdiffError(
                f"unknown class split {split!r}; expected one of {sorted(SPLITS)} or a pair "
                "(lo, hi) with 0 < lo < 0.5 < hi < 1"
            )
        return (split, *SPLITS[split])
    try:
        lo, hi = (float(v) for v in split)
    except (TypeError, ValueError) as err:
        raise CrossdiffError(f"split must be a name or a pair (lo, hi); got {split!r}") from err
    if not 0.0 < lo < 0.5 < hi < 1.0:
        raise CrossdiffError(
            f"split thresholds ({lo}, {hi}) are not valid; expected 0 < lo < 0.5 < hi < 1, "
            "e.g. (0.3, 0.7)"
        )
    return (f"custom {lo:g}/{hi:g}", lo, hi)


def class_names(model_a: str, model_b: str) -> tuple[str, ...]:
    """All classes in display order."""
    return (DESIGNATED, SHARED, f"{model_a}-only", f"{model_b}-only", DEAD)


def relative_norm(
    norms: Float[Tensor, "d_sae n_models"], a: int, b: int
) -> Float[Tensor, " d_sae"]:
    """r = ||d_B|| / (||d_A|| + ||d_B||); NaN where both norms are zero."""
    total = norms[:, a] + norms[:, b]
    return torch.where(total > 0, norms[:, b] / total.clamp_min(1e-30), torch.nan)


def decoder_cosine(
    w_dec: Float[Tensor, "d_sae n_models d_model"], a: int, b: int
) -> Float[Tensor, " d_sae"]:
    """Cosine between a latent's decoder vectors in model A and model B; NaN for a zero vector."""
    va, vb = w_dec[:, a].float(), w_dec[:, b].float()
    denom = va.norm(dim=-1) * vb.norm(dim=-1)
    return torch.where(denom > 0, (va * vb).sum(-1) / denom.clamp_min(1e-30), torch.nan)


def classify(
    r: np.ndarray,
    fires: np.ndarray,
    n_shared: int,
    lo: float,
    hi: float,
    model_a: str,
    model_b: str,
) -> np.ndarray:
    """One class per latent. Dead (never fired) wins, then designated-shared, then the r split.

    n_shared: how many leading latents get the class designated-shared; diff_features passes the
    crosscoder's n_shared only for tied decoders and 0 for free ones (a free designated latent is
    only a cheaper latent, so its relative norm classes it like any other).
    A latent with both decoder norms zero (r is NaN) that fires is called shared.
    """
    labels = np.full(r.shape, SHARED, dtype=object)
    labels[r < lo] = f"{model_a}-only"
    labels[r > hi] = f"{model_b}-only"
    labels[:n_shared] = DESIGNATED
    labels[~fires] = DEAD
    return labels


def partition_owner(cc: object, d_sae: int) -> np.ndarray | None:
    """A Dedicated Feature Crosscoder's owner per latent (-1 shared, m exclusive to model m);
    None for a crosscoder without a partition."""
    cfg = getattr(cc, "cfg", None)
    if getattr(cfg, "partition", None) is None:
        return None
    from crossdiff.crosscoder.partition import latent_owner

    return np.asarray(latent_owner(cfg.partition, d_sae), dtype=np.int64)  # type: ignore[union-attr]


def classify_partition(
    owner: np.ndarray,
    fires: np.ndarray,
    n_shared: int,
    model_names: tuple[str, ...] | list[str],
) -> np.ndarray:
    """A DFC's classes from its partition: a latent exclusive to model m is "{m}-only", the
    others shared (designated-shared for the first n_shared); dead (never fired) wins."""
    labels = np.full(owner.shape, SHARED, dtype=object)
    for m, name in enumerate(model_names):
        labels[owner == m] = f"{name}-only"
    labels[:n_shared] = DESIGNATED
    labels[~fires] = DEAD
    return labels
