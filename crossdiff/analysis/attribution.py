"""Per-latent attribution to an architecture, from one crosscoder over 2N models.

With N model seeds per architecture (dense_1..dense_N, moe_1..moe_N, trained on the same tokens)
one crosscoder reads all 2N models' activations, so each latent has one decoder norm per model.
The rule, at a split lo / (1 - lo) (the pairwise split's thresholds, 0.3/0.7 in the paper):

    model m carries latent i when ||d_m,i|| / (||d_m,i|| + max_m' ||d_m',i||) >= lo,

that is when the pairwise relative norm of m against the latent's strongest model is not in the
exclusive tail. For two models this is exactly the pairwise split. Then per latent:

    shared          carried by every model
    <A>-specific    carried by every model of architecture A and by none of B (and vice versa)
    seed-private    carried by exactly one model (one model seed's own feature)
    partial         any other pattern (some models of one or both architectures)
    dead            never fires on the evaluated tokens

An architecture-specific latent is one that every model seed of one architecture has and no seed
of the other: a seed-private feature of a noisier architecture is never counted as one. With
designated shared latents (tied decoders) the `designated-shared` class is kept apart, and the
paper's accounting, which folds it into shared, is reported beside it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from crossdiff.plumbing.common import CrossdiffError

THRESHOLDS = (0.3, 0.2, 0.1)  # lo of the splits 0.3/0.7, 0.2/0.8 and 0.1/0.9
SHARED, PRIVATE, PARTIAL, DEAD, DESIGNATED = (
    "shared", "seed-private", "partial", "dead", "designated-shared",
)  # fmt: skip


def specific(arch: str) -> str:
    return f"{arch}-specific"


def split_label(lo: float) -> str:
    return f"{lo:g}/{1 - lo:g}"


def carriers(norms: np.ndarray, lo: float) -> np.ndarray:
    """[d_sae, n_models] bool: which models carry each latent at split lo (module docstring)."""
    if not 0.0 < lo < 0.5:
        raise CrossdiffError(f"split lo={lo} must be in (0, 0.5), e.g. 0.3 for 0.3/0.7")
    norms = np.asarray(norms, dtype=np.float64)
    top = norms.max(axis=1, keepdims=True)
    ratio = norms / np.maximum(norms + top, 1e-30)
    return (ratio >= lo) & (top > 0)


def classify_latents(
    carried: np.ndarray,
    groups: dict[str, Sequence[int]],
    live: np.ndarray,
    n_designated: int = 0,
) -> np.ndarray:
    """One class per latent from its carriers [d_sae, n_models] and the architectures' model
    columns (`groups`: two names -> column indices)."""
    if len(groups) != 2:
        raise CrossdiffError(f"groups must name two architectures, got {list(groups)}")
    (a, cols_a), (b, cols_b) = groups.items()
    in_a, in_b = carried[:, list(cols_a)], carried[:, list(cols_b)]
    labels = np.full(carried.shape[0], PARTIAL, dtype=object)
    labels[carried.sum(1) == 1] = PRIVATE
    labels[in_a.all(1) & ~in_b.any(1)] = specific(a)
    labels[in_b.all(1) & ~in_a.any(1)] = specific(b)
    labels[carried.all(1)] = SHARED
    labels[:n_designated] = DESIGNATED
    labels[~np.asarray(live, dtype=bool)] = DEAD
    return labels


def class_list(a: str, b: str) -> tuple[str, ...]:
    return (DESIGNATED, SHARED, specific(a), specific(b), PRIVATE, PARTIAL, DEAD)


def counts(labels: np.ndarray, a: str, b: str) -> dict[str, int]:
    return {c: int((labels == c).sum()) for c in class_list(a, b)}


def group_specific_counts(carried: np.ndarray, g1: Sequence[int], g2: Sequence[int]) -> tuple:
    """(latents carried by all of g1 and none of g2, and the reverse) among live latents."""
    c1, c2 = carried[:, list(g1)], carried[:, list(g2)]
    return int((c1.all(1) & ~c2.any(1)).sum()), int((c2.all(1) & ~c1.any(1)).sum())


def balanced_splits(n_models: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every ordered split of range(n_models) into two groups of n_models / 2."""
    half = n_models // 2
    out = []
    for g1 in itertools.combinations(range(n_models), half):
        g2 = tuple(m for m in range(n_models) if m not in g1)
        out.append((g1, g2))
    return out


def pair_relative_norms(norms: np.ndarray, live: np.ndarray, i: int, j: int) -> dict[str, Any]:
    """The distribution of r = ||d_j|| / (||d_i|| + ||d_j||) over live latents: sd, quantiles,
    range and a 20-bin histogram on [0, 1]."""
    n = np.asarray(norms, dtype=np.float64)[np.asarray(live, dtype=bool)]
    total = n[:, i] + n[:, j]
    r = n[total > 0, j] / total[total > 0]
    if not len(r):
        return {"n": 0}
    q = np.quantile(r, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
    hist, _ = np.histogram(r, bins=20, range=(0.0, 1.0))
    return {
        "n": int(len(r)),
        "sd": float(r.std(ddof=1)) if len(r) > 1 else None,
        "min": float(r.min()),
        "max": float(r.max()),
        "quantiles": dict(
            zip(
                ("q01", "q05", "q25", "q50", "q75", "q95", "q99"),
                (float(x) for x in q),
                strict=True,
            )
        ),  # fmt: skip
        "histogram": [int(h) for h in hist],
    }


def pair_splits(table: Any, name_a: str, name_b: str) -> dict[str, Any]:
    """A pairwise diff's exclusive counts at each split of THRESHOLDS, with and without latents
    flagged as latent-scaling artifacts (flags exist for the latents exclusive at the diff's own
    split, which hold those of every stricter split), and the distribution of r over live
    latents. `nothing_exclusive`: no live latent is exclusive at the strictest split."""
    live = table["class"].to_numpy().astype(str) != DEAD
    free = ~table["designated_shared"].to_numpy().astype(bool)
    r = table["relative_norm"].to_numpy(dtype=np.float64)
    flagged = (
        table["scaling_artifact"].to_numpy().astype(bool)
        if "scaling_artifact" in table
        else np.zeros(len(r), dtype=bool)
    )
    out: dict[str, Any] = {"splits": {}}
    for lo in THRESHOLDS:
        a_only = live & free & (r < lo)
        b_only = live & free & (r > 1 - lo)
        out["splits"][split_label(lo)] = {
            f"{name_a}-only": int(a_only.sum()),
            f"{name_b}-only": int(b_only.sum()),
            f"{name_a}-only without artifacts": int((a_only & ~flagged).sum()),
            f"{name_b}-only without artifacts": int((b_only & ~flagged).sum()),
        }
    strict = out["splits"][split_label(min(THRESHOLDS))]
    out["nothing_exclusive"] = strict[f"{name_a}-only"] + strict[f"{name_b}-only"] == 0
    norms = np.stack([1 - np.nan_to_num(r, nan=0.5), np.nan_to_num(r, nan=0.5)], 1)
    out["relative_norm"] = pair_relative_norms(norms, live & free & np.isfinite(r), 0, 1)
    return out
