"""Latent scaling (Minder, Dumas et al., arXiv 2504.02922) for model-specific latents.

For latent j with activations f_t, a direction v in model m's space and a target y_t in that
space, the least-squares scale of v that best explains y from f is

    beta = <v, sum_t f_t y_t> / (||v||^2 sum_t f_t^2).

Two targets per model m (x: the raw activation, x_hat: the crosscoder's full reconstruction):
  error           y = x - x_hat + f_j d_jm   (what the other latents leave unexplained;
                                              latent j's own contribution is added back)
  reconstruction  y = x_hat - b_dec          (the latents' part of the reconstruction, latent j
                                              included; the decoder bias is no latent's doing)

The direction v is the latent's own decoder vector d_jm in each model when the two models have
unrelated bases (dense vs MoE trained independently), and the decoder vector of the model the
latent is specific to when the bases are shared (Minder et al.'s set-up). The ratio

    nu = beta_other ||v_other|| / (beta_own ||v_own||)

is the other model's effective decoder norm over the own model's after the best rescaling (in the
units of the decoder norms that define the classes; with scaling factors s_m both effective norms
are multiplied by their model's s_m); with a shared basis it is exactly Minder et al.'s
beta_other / beta_own. A latent is flagged as a shrinkage artifact when nu (error or
reconstruction) exceeds the norm ratio its class allows (lo/(1-lo) for A-only, (1-hi)/hi for
B-only): after rescaling it would no longer be classed model-specific.
"""

from __future__ import annotations

import numpy as np


def latent_scaling(
    w_dec: np.ndarray,
    sq_sum: np.ndarray,
    latents: np.ndarray,
    own: np.ndarray,
    other: np.ndarray,
    sum_f_err: np.ndarray,
    sum_f_rec: np.ndarray,
    tolerance: np.ndarray,
    same_basis: bool,
    unit_scale: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Betas and ratios for `latents` (all arrays indexed like `latents`).

    w_dec [d_sae, n_models, d]; sq_sum [d_sae] = sum f^2; own/other: model index per latent;
    sum_f_err / sum_f_rec [n_models, n_latents, d]: sum_t f_t (x - x_hat) and
    sum_t f_t (x_hat - b_dec);
    tolerance: the allowed effective-norm ratio per latent. unit_scale [n_models]: what turns a
    raw decoder norm into the units the classes use (the crosscoder's scaling factors).
    """
    scale = np.ones(w_dec.shape[1]) if unit_scale is None else np.asarray(unit_scale, float)
    n = len(latents)
    q = sq_sum[latents]
    out = {
        key: np.full(n, np.nan)
        for key in ("beta_err_own", "beta_err_other", "beta_rec_own", "beta_rec_other")
    }
    eff: dict[str, np.ndarray] = {}
    rows = np.arange(n)
    for role, model in (("own", own), ("other", other)):
        d_actual = w_dec[latents, model]  # [n, d]: the latent's real vector in this model
        v = w_dec[latents, own] if same_basis else d_actual
        v_norm = np.linalg.norm(v, axis=-1)
        s_err = sum_f_err[model, rows] + q[:, None] * d_actual
        s_rec = sum_f_rec[model, rows]
        ok = (v_norm > 0) & (q > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            for target, s in (("err", s_err), ("rec", s_rec)):
                proj = (v * s).sum(-1)
                beta = np.where(ok, proj / (v_norm**2 * q), np.nan)
                out[f"beta_{target}_{role}"] = beta
                eff[f"{target}_{role}"] = beta * v_norm * scale[model]
    with np.errstate(divide="ignore", invalid="ignore"):
        nu_err = eff["err_other"] / eff["err_own"]
        nu_rec = eff["rec_other"] / eff["rec_own"]
    out["nu_err"] = nu_err
    out["nu_rec"] = nu_rec
    out["artifact"] = (np.nan_to_num(nu_err, nan=-np.inf) > tolerance) | (
        np.nan_to_num(nu_rec, nan=-np.inf) > tolerance
    )
    return out
