"""Per-class sample descriptions and per-latent expert entropy (the claims are in claims.py)."""

from __future__ import annotations

import numpy as np


def describe(values: np.ndarray) -> dict[str, float | int | None]:
    """n, median, quartiles and mean of a sample (None for an empty one)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"n": 0, "median": None, "q1": None, "q3": None, "mean": None}
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return {
        "n": int(len(values)),
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "mean": float(values.mean()),
    }


def expert_entropy(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of routed-expert counts: entropy (bits), top expert, its share (NaN/-1 if none)."""
    total = counts.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, counts / np.where(total > 0, total, 1), 0.0)
        logp = np.where(p > 0, np.log2(np.where(p > 0, p, 1)), 0.0)
    entropy = -(p * logp).sum(-1)
    empty = total[..., 0] <= 0
    entropy = np.where(empty, np.nan, entropy)
    top = np.where(empty, -1, p.argmax(-1))
    share = np.where(empty, np.nan, p.max(-1))
    return entropy, top, share
