"""The intervals of screen-and-verify: a bootstrap interval of a mean, and Wilson's interval of a
share (both scipy.stats')."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float


def bootstrap_mean_ci(
    values: Float[np.ndarray, " n"], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of `values` (None, None when there are fewer
    than 2 finite values): scipy.stats.bootstrap, seeded."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None, None
    result = bootstrap(
        (values,),
        np.mean,
        n_resamples=n_boot,
        confidence_level=level,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilson_interval(
    successes: int, total: int, level: float = 0.95
) -> tuple[float | None, float | None]:
    """Wilson score interval of successes / total (None, None when total is 0): scipy's."""
    from scipy.stats import binomtest

    if total <= 0:
        return None, None
    ci = binomtest(successes, total).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)
