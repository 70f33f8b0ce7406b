"""FeatureDiff: what diff_features returns (the per-latent table, the class summary, the panels)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from crossdiff.analysis.source import TokenSource
from crossdiff.plumbing.common import CrossdiffError


@dataclass
class FeatureDiff:
    """The result of diff_features.

    table: one row per latent (see docs/report.md for the columns); summary: class-level numbers and
    the sentences that state them; config: how the run was made; details: per-latent panels (top
    contexts, expert counts, domain shares) for the latents the report shows.
    """

    table: pd.DataFrame
    summary: dict[str, Any]
    config: dict[str, Any]
    details: dict[int, dict[str, Any]]
    top_indices: np.ndarray  # [d_sae, n_top] store index of each latent's top tokens, -1 for none
    top_values: np.ndarray  # [d_sae, n_top]
    expert_counts: np.ndarray | None  # [d_sae, n_pairs] routed (layer, expert) counts, layer-major
    crosscoder: Any = field(default=None, repr=False)
    source: TokenSource | None = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def latents(self, cls: str) -> pd.DataFrame:
        """The table's rows of one class, e.g. diff.latents('moe-only')."""
        known = set(self.table["class"])
        if cls not in known and cls not in self.summary["class_counts"]:
            raise CrossdiffError(f"unknown class {cls!r}; this diff has {sorted(known)}")
        return self.table[self.table["class"] == cls]

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.summary["class_counts"].items())
        return f"FeatureDiff({len(self.table)} latents; {counts})"
