"""Per-class sample descriptions (the claims are in claims.py; expert entropy in experts.py)."""

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
