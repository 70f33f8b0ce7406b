"""The latent-scaling columns of a feature diff's table and their summary (the measure itself is
in latent_scaling.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from crossdiff.analysis.accumulate import PassStats
from crossdiff.analysis.latent_scaling import (
    MIN_SHARE,
    free_direction_scaling,
    own_direction_scaling,
)


def add_latent_scaling(
    table: pd.DataFrame,
    stats: PassStats,
    w_dec: torch.Tensor,
    labels: np.ndarray,
    ids: np.ndarray,
    a: int,
    b: int,
    name_a: str,
    name_b: str,
    lo: float,
    hi: float,
    same_basis: bool,
    unit_scale: np.ndarray,
) -> dict[str, Any]:
    """Add the latent-scaling columns for the live model-specific latents to `table` (see
    latent_scaling.py); return the summary of how they were computed."""
    d_sae = len(table)
    nan = {
        key: np.full(d_sae, np.nan)
        for key in (
            f"scaling_signal_{name_a}", f"scaling_signal_{name_b}", f"scaling_share_{name_a}",
            f"scaling_share_{name_b}", "scaling_ratio", "scaling_ratio_rec", "scaling_share_rec",
            f"beta_err_{name_a}", f"beta_err_{name_b}", f"beta_rec_{name_a}",
            f"beta_rec_{name_b}", "nu_err", "nu_rec",
        )
    }  # fmt: skip
    cols: dict[str, np.ndarray] = {**nan, "scaling_artifact": np.zeros(d_sae, dtype=bool)}
    tol_a, tol_b = lo / (1 - lo), (1 - hi) / hi
    sums = stats.scaling
    if sums is not None:
        live = np.isin(labels[sums.latents], [f"{name_a}-only", f"{name_b}-only"])
        sums = sums.subset(live)
    if sums is not None and len(sums.latents):
        ids = sums.latents
        is_b = labels[ids] == f"{name_b}-only"
        own, other = np.where(is_b, b, a), np.where(is_b, a, b)
        tol = np.where(is_b, tol_b, tol_a)
        w = w_dec.double().cpu().numpy()
        free = free_direction_scaling(
            sums, w, stats.fire_count, stats.act_sum, stats.act_sq_sum, own, other, tol,
            unit_scale,
        )  # fmt: skip

        for name, mine in ((name_a, ~is_b), (name_b, is_b)):
            for key in ("signal", "share"):
                cols[f"scaling_{key}_{name}"][ids] = np.where(
                    mine, free[f"{key}_own"], free[f"{key}_other"]
                )
        cols["scaling_ratio"][ids] = free["ratio_act"]
        cols["scaling_ratio_rec"][ids] = free["ratio_rec"]
        cols["scaling_share_rec"][ids] = free["share_rec_other"]
        flags = free["artifact"]
        if same_basis:
            minder = own_direction_scaling(sums, w, stats.act_sq_sum, own, other, tol, unit_scale)
            for name, mine in ((name_a, ~is_b), (name_b, is_b)):
                for target in ("err", "rec"):
                    cols[f"beta_{target}_{name}"][ids] = np.where(
                        mine, minder[f"beta_{target}_own"], minder[f"beta_{target}_other"]
                    )
            cols["nu_err"][ids] = minder["nu_err"]
            cols["nu_rec"][ids] = minder["nu_rec"]
            flags = minder["artifact"]
        cols["scaling_artifact"][ids] = flags
    n_computed = 0 if sums is None else len(sums.latents)
    for key, value in cols.items():
        table[key] = value
    flagged = {
        cls: int(table.loc[table["class"] == cls, "scaling_artifact"].sum())
        for cls in (f"{name_a}-only", f"{name_b}-only")
    }
    return scaling_summary(n_computed, flagged, name_a, name_b, tol_a, tol_b, same_basis)


def scaling_summary(
    n_computed: int,
    flagged: dict[str, int],
    name_a: str,
    name_b: str,
    tol_a: float,
    tol_b: float,
    same_basis: bool,
) -> dict[str, Any]:
    """summary["latent_scaling"]: what was computed, how many latents are flagged, and the rule."""
    tolerance = {f"{name_a}-only": tol_a, f"{name_b}-only": tol_b}
    if same_basis:
        return {
            "computed": bool(n_computed),
            "n_latents": int(n_computed),
            "n_flagged": flagged,
            "tolerance": tolerance,
            "form": "own-direction (Minder, Dumas et al.; same_basis=True)",
            "columns": ["nu_err", "nu_rec"],
            "direction": "the specific model's decoder vector in both models (shared basis)",
            "targets": {
                "err": "x - x_hat + f d (the error with the latent's own contribution added back)",
                "rec": "x_hat (the full reconstruction, decoder bias included)",
            },
            "rule": (
                "beta = <d_own, sum f y> / (|d_own|^2 sum f^2); nu = beta_other / beta_own; a "
                "latent is flagged when nu_err or nu_rec exceeds the norm ratio its class allows "
                "(lo/(1-lo) or (1-hi)/hi)"
            ),
        }
    return {
        "computed": bool(n_computed),
        "n_latents": int(n_computed),
        "n_flagged": flagged,
        "tolerance": tolerance,
        "min_share": MIN_SHARE,
        "form": "free direction (unrelated bases; same_basis=False)",
        "columns": ["scaling_ratio", "scaling_ratio_rec"],
        "direction": "fitted freely in each model's space over the tokens where the latent fires",
        "targets": {
            "act": "each model's activation x (own and other model)",
            "rec": "the other model's reconstruction without the latent, x_hat - f d "
            "(decoder bias included)",
        },
        "rule": (
            "fit y ~ a + v f over the latent's firing tokens (intercept; chance part of |v|^2 "
            "removed); ratio = s_other |v_other| / (s_own |v_own(x)|) in the classes' units; a "
            "latent is flagged when the ratio on the other model's activation or on its "
            "reconstruction without the latent exceeds the norm ratio its class allows "
            f"(lo/(1-lo) or (1-hi)/hi) and that fit explains >= {MIN_SHARE:g} of the other "
            "model's variance on those tokens"
        ),
    }
