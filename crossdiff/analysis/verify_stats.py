"""The intervals of screen-and-verify: a bootstrap interval of a mean, and Wilson's interval of a
share."""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Float


def bootstrap_mean_ci(
    values: Float[np.ndarray, " n"], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of `values` (None, None when there are fewer
    than 2 values)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def wilson_interval(
    successes: int, total: int, z: float = 1.959964
) -> tuple[float | None, float | None]:
    """Wilson score interval of successes / total (None, None when total is 0)."""
    if total <= 0:
        return None, None
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)
