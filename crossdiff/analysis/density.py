"""Per-class density statistics; the paper's two density claims as one-sided Mann-Whitney tests."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

ALPHA = 0.05


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


def density_test(
    group: np.ndarray,
    reference: np.ndarray,
    *,
    group_name: str,
    reference_name: str,
    alternative: str,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """One-sided Mann-Whitney U: does `group` fire more ('greater') or less ('less') densely?"""
    word = "more" if alternative == "greater" else "less"
    claim = f"{group_name} latents fire {word} densely than {reference_name} latents"
    result: dict[str, Any] = {
        "claim": claim,
        "test": "one-sided Mann-Whitney U (scipy.stats.mannwhitneyu)",
        "alternative": alternative,
        "alpha": alpha,
        "n_group": int(len(group)),
        "n_reference": int(len(reference)),
        "median_group": float(np.median(group)) if len(group) else None,
        "median_reference": float(np.median(reference)) if len(reference) else None,
        "u_statistic": None,
        "p_value": None,
        "holds": None,
    }
    if len(group) < 2 or len(reference) < 2:
        result["sentence"] = (
            f"Cannot test whether {claim}: {len(group)} {group_name} and {len(reference)} "
            f"{reference_name} latents fire (at least 2 of each are needed)."
        )
        return result
    test = mannwhitneyu(group, reference, alternative=alternative)
    p = float(test.pvalue)
    holds = p < alpha
    result.update(u_statistic=float(test.statistic), p_value=p, holds=bool(holds))
    verdict = "holds" if holds else "does not hold"
    result["sentence"] = (
        f"{claim[0].upper()}{claim[1:]}: {verdict} for this run (p = {p:.3g} at alpha = {alpha:g}; "
        f"median density {result['median_group']:.3g} vs {result['median_reference']:.3g})."
    )
    return result
