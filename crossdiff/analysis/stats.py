"""Small statistics for the claims: Cliff's delta with a vectorised bootstrap, Holm's step-down
adjustment, and a bootstrap of a proportion. Pure numpy; every function is deterministic given
its seed."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float
from scipy.stats import binomtest, mannwhitneyu

CI_LEVEL = 0.95
N_RESAMPLES = 2000
SEED = 0
# resamples drawn at once; bounds memory at about 4 * CHUNK * min(len(x), len(y)) int64 values
_CHUNK = 250


# hand-written: scipy has no Cliff's delta (it is mannwhitneyu's U rescaled, computed directly)
def cliffs_delta(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " m"]) -> float:
    """P(X > Y) - P(X < Y) over all pairs (ties count 0), in [-1, 1]; equals the rank-biserial
    correlation 2U / (n m) - 1 of the Mann-Whitney U of x against y. O((n + m) log m)."""
    if len(x) == 0 or len(y) == 0:
        raise ValueError("Cliff's delta needs at least one value in each sample")
    ys = np.sort(np.asarray(y, dtype=np.float64))
    x = np.asarray(x, dtype=np.float64)
    below = np.searchsorted(ys, x, side="left").sum()  # pairs with y < x
    above = (len(ys) - np.searchsorted(ys, x, side="right")).sum()  # pairs with y > x
    return float((below - above) / (len(x) * len(ys)))


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


# hand-written, not scipy.stats.bootstrap: that would evaluate delta on every resample (a sort
# each); the binned draws below cost O(distinct values) per resample, and claims need the resamples
def bootstrap_cliffs_delta(
    x: Float[np.ndarray, " n"],
    y: Float[np.ndarray, " m"],
    *,
    n_resamples: int = N_RESAMPLES,
    level: float = CI_LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap CI of Cliff's delta, resampling x and y independently (the
    resamples are `cliffs_delta_resamples`)."""
    samples = cliffs_delta_resamples(x, y, n_resamples=n_resamples, seed=seed)
    return _percentile_ci(samples, level)


def cliffs_delta_resamples(
    x: Float[np.ndarray, " n"],
    y: Float[np.ndarray, " m"],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Float[np.ndarray, " n_resamples"]:
    """Cliff's delta of n_resamples bootstrap resamples of x and y (drawn independently).

    Vectorised, without a sort per resample: only the order of each y relative to the distinct
    x values matters, so y is reduced to counts in 2K + 1 bins (below, at, between and above
    the K distinct x values) and x to counts of its distinct values. A resample is then two
    multinomial draws, and the running sum of the y bins gives, for every x value at once, how
    many resampled y lie below and above it. Cost O(n_resamples * K) with K <= min(n, m).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("a bootstrap needs at least one value in each sample")
    if n > m:  # bin by the smaller sample; delta(x, y) = -delta(y, x)
        return -cliffs_delta_resamples(y, x, n_resamples=n_resamples, seed=seed)
    distinct, x_counts = np.unique(x, return_counts=True)
    k = len(distinct)
    pos = np.searchsorted(distinct, y, side="left")
    tie = (pos < k) & (distinct[np.minimum(pos, k - 1)] == y)
    y_counts = np.bincount(2 * pos + tie, minlength=2 * k + 1)
    filled = np.nonzero(y_counts)[0]  # empty bins never draw anything: skip them
    below_at = np.searchsorted(filled, 2 * np.arange(k) + 1)  # filled bins 0 .. 2j
    upto_at = np.searchsorted(filled, 2 * np.arange(k) + 2)  # filled bins 0 .. 2j + 1
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        c = min(_CHUNK, n_resamples - start)
        y_draw = rng.multinomial(m, y_counts[filled] / m, size=c)
        cum = np.zeros((c, len(filled) + 1), dtype=np.int64)
        np.cumsum(y_draw, axis=1, out=cum[:, 1:])
        below = cum[:, below_at]  # resampled y below distinct[j]
        above = m - cum[:, upto_at]  # resampled y above distinct[j]
        x_draw = rng.multinomial(n, x_counts / n, size=c)
        out[start : start + c] = (x_draw * (below - above)).sum(1) / (n * m)
    return out


# hand-written, not scipy.stats.bootstrap: resampling `total` 0/1 items is one binomial draw, which
# scipy would spell out item by item
def bootstrap_proportion(
    successes: int,
    total: int,
    *,
    n_resamples: int = N_RESAMPLES,
    level: float = CI_LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap CI of successes / total, resampling the `total` items."""
    if total < 1:
        raise ValueError("a proportion needs at least one item")
    rng = np.random.default_rng(seed)
    samples = rng.binomial(total, successes / total, size=n_resamples) / total
    return _percentile_ci(samples, level)


# hand-written: scipy has no Holm adjustment (statsmodels' multipletests is not a dependency)
def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment over the non-None p-values (None stays None): sorted
    ascending, p_(i) becomes max over j <= i of min(1, (m - j + 1) p_(j)), m the number tested."""
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(tested)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def mann_whitney_p(x: np.ndarray, y: np.ndarray, alternative: str) -> float:
    """One-sided Mann-Whitney U p-value of x against y ('greater': x tends to be larger)."""
    return float(mannwhitneyu(x, y, alternative=alternative).pvalue)


def binomial_p(successes: int, total: int, alternative: str) -> float:
    """Exact binomial test of successes out of total against p0 = 0.5."""
    return float(binomtest(successes, total, 0.5, alternative=alternative).pvalue)
