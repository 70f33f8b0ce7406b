"""The Dedicated Feature Crosscoder's partition (Jiralerspong & Bricken, arXiv 2602.11729): which
latents are exclusive to which model, and the masks that keep the other models off them.

A DFC's dictionary is split into shared latents and, per model, latents exclusive to it. Model m
reads (encoder) and writes (decoder) only the shared latents and its own exclusive ones; the
other models' encoder and decoder weights of an exclusive latent are zero and stay zero (their
gradients are masked, so neither the reconstruction nor the auxiliary loss moves them). The
encoder bias is one per latent and is not masked. BatchTopK still selects over the whole
dictionary. crossdiff puts the exclusive latents at the end of the dictionary (model 0's first),
so the designated shared latents stay the first n_shared.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.plumbing.common import CrossdiffError

ARCHITECTURES = ("standard", "dfc")
DFC_EXCLUSIVE_FRACTION = 0.05  # per model, of d_sae: the DFC reference code's example (5 % + 5 %)


def resolve_partition(value: Any, d_sae: int, n_models: int, n_shared: int) -> tuple[int, ...]:
    """Per-model exclusive counts from counts or one fraction of d_sae (checked)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool | numbers.Integral):
        if not 0 < value < 1 / n_models:
            raise CrossdiffError(
                f"partition={value!r}: a fraction of d_sae per model must lie in (0, "
                f"1/n_models={1 / n_models:.3g}); the DFC default is {DFC_EXCLUSIVE_FRACTION}"
            )
        value = [max(1, int(d_sae * value))] * n_models
    counts = list(value) if isinstance(value, list | tuple) else None
    if (
        counts is None
        or len(counts) != n_models
        or not all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0 for c in counts
        )
    ):
        raise CrossdiffError(
            f"partition={value!r}: give one exclusive-latent count (>= 0) per model "
            f"(n_models={n_models}), e.g. partition=(64, 64), or a fraction such as 0.05"
        )
    total = sum(int(c) for c in counts)
    if total < 1 or n_shared + total > d_sae:
        raise CrossdiffError(
            f"partition={counts}: the exclusive latents ({total}) must be at least 1 and fit "
            f"with the n_shared={n_shared} designated shared latents in d_sae={d_sae}; lower "
            "the counts or raise d_sae"
        )
    return tuple(int(c) for c in counts)


def partition_ranges(partition: Any, d_sae: int) -> list[tuple[int, int]]:
    """Per model, [start, stop) of its exclusive latents; [] for a standard crosscoder."""
    if partition is None:
        return []
    start = d_sae - sum(partition)
    out = []
    for count in partition:
        out.append((start, start + int(count)))
        start += int(count)
    return out


def latent_owner(partition: Any, d_sae: int) -> list[int]:
    """Per latent, the model it is exclusive to, or -1 for a latent every model uses."""
    owner = [-1] * d_sae
    for m, (start, stop) in enumerate(partition_ranges(partition, d_sae)):
        owner[start:stop] = [m] * (stop - start)
    return owner


def partition_mask(
    partition: Any, d_sae: int, n_models: int, **kw: Any
) -> Float[Tensor, "d_sae n_models"]:
    """1 where model m may read and write latent i, 0 where it may not."""
    mask = torch.ones(d_sae, n_models, **kw)
    for m, (start, stop) in enumerate(partition_ranges(partition, d_sae)):
        mask[start:stop] = 0
        mask[start:stop, m] = 1
    return mask
