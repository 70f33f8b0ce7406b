"""A Dedicated Feature Crosscoder's classes in the diff: the partition's class per latent, with
the relative-norm class beside it (the table's `partition` and `class_relative_norm` columns and
the summary's `partition` block)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def add_partition_columns(
    table: pd.DataFrame,
    owner: np.ndarray,
    norm_labels: np.ndarray,
    model_names: tuple[str, ...] | list[str],
) -> None:
    """`partition`: "shared" or the model a latent is exclusive to; `class_relative_norm`: the
    class the relative decoder norm gives (what a standard crosscoder's `class` would be)."""
    names = np.array(["shared", *model_names], dtype=object)
    table["partition"] = names[owner + 1].astype(str)
    table["class_relative_norm"] = norm_labels.astype(str)


def partition_summary(
    cfg: Any,
    labels: np.ndarray,
    norm_labels: np.ndarray,
    classes: tuple[str, ...],
    split: tuple[float, float],
) -> dict[str, Any]:
    """The partition's sizes, its class counts, the relative-norm counts, and how they cross."""
    ranges = cfg.partition_ranges()
    return {
        "architecture": "dfc",
        "exclusive": [int(c) for c in cfg.partition],
        "ranges": [[int(a), int(b)] for a, b in ranges],
        "n_shared_partition": int(cfg.d_sae - sum(cfg.partition)),
        "rule": "class from the partition: a latent exclusive to model m is m-only (it has no "
        "encoder or decoder weights in any other model); the other latents are shared; dead "
        "(never fires on the analysed tokens) wins",
        "class_counts": {c: int((labels == c).sum()) for c in classes},
        "class_counts_relative_norm": {c: int((norm_labels == c).sum()) for c in classes},
        "relative_norm_split": list(split),
        "crossed": {
            c: {d: int(((labels == c) & (norm_labels == d)).sum()) for d in classes}
            for c in classes
        },
    }
