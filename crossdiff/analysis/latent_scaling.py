"""Latent scaling: does the other model carry a model-specific latent's signal anyway?

A latent j classed exclusive to model A ("own" = A, "other" = B) has a small decoder vector in B.
That can be a real difference, or an artifact: B carries j's signal, but the crosscoder
reconstructs it with other latents (decoupling) or leaves it in the error (shrinkage).

**Unrelated bases (the default: dense vs MoE trained independently).** B's direction for j is
unknown, so it is fitted: over the tokens where j fires, a least-squares fit of a target y in a
model's space on f_j with an intercept,

    v = sum_t (f_t - f_mean)(y_t - y_mean) / sum_t (f_t - f_mean)^2,

measures how y moves with j's activation. The intercept keeps what is merely present whenever j
fires (the models' mean activation, context that co-occurs with j) out of v: only a signal that
follows j's magnitude counts. Targets: the own model's activation x_A (what j itself explains),
the other model's activation x_B, and the other model's reconstruction without latent j,
x_hat_B - f_j d_B,j (decoder bias included; it only moves the intercept). Signals are compared in
the units the classes use (the crosscoder's scaling factors s_m), with the chance part removed:
|v|^2 is biased up by the residual variance over sum (f - f_mean)^2, which is subtracted, so a
target unrelated to f gets a signal near 0 however many dimensions it has.

    ratio_act = s_B |v(x_B)| / (s_A |v(x_A)|)        ratio_rec = s_B |v(x_hat_B - f d_B)| / (same)

A latent is flagged (`scaling_artifact`) when a ratio exceeds the norm ratio its class allows
(lo/(1-lo) for A-only, (1-hi)/hi for B-only: rescaled by it, the latent would not be classed
model-specific) and that fit explains at least MIN_SHARE of the other model's variance on j's
tokens (so a noisy fit of a weak latent does not count).

**Shared basis (`same_basis=True`, two checkpoints of one model): Minder, Dumas et al.'s form.**
v is the own model's decoder vector d_own in both models and only its scale is fitted:
beta = <d_own, sum_t f_t y_t> / (|d_own|^2 sum_t f_t^2), for y = x - x_hat + f_j d_m,j (error)
and y = x_hat (full reconstruction, decoder bias included); nu = beta_other / beta_own. On a
BatchTopK crosscoder beta_err along the latent's own vector is 1 by construction (its decoder is
trained by the reconstruction loss alone), which is why the unrelated-basis form fits a free
direction in the other model instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

MIN_SHARE = 0.02  # least share of the other model's variance on j's tokens that a flag needs
MIN_FIRINGS = 100  # fewer firing tokens: no fit (the chance share is about 1/n)


@dataclass
class ScalingSums:
    """Sums over the tokens where each latent of `latents` fires (numpy float64).

    f_x, f_xhat [n_models, n, d]: sum f x, sum f x_hat; x, xhat [n_models, n, d]: sum x, sum x_hat;
    x_sq, xhat_sq [n_models, n]: sum |x|^2, sum |x_hat|^2. x_hat includes the decoder bias."""

    latents: np.ndarray
    f_x: np.ndarray
    f_xhat: np.ndarray
    x: np.ndarray
    xhat: np.ndarray
    x_sq: np.ndarray
    xhat_sq: np.ndarray

    def subset(self, keep: np.ndarray) -> ScalingSums:
        return ScalingSums(
            self.latents[keep], self.f_x[:, keep], self.f_xhat[:, keep], self.x[:, keep],
            self.xhat[:, keep], self.x_sq[:, keep], self.xhat_sq[:, keep],
        )  # fmt: skip


class ScalingAccumulator:
    """Accumulates ScalingSums batch by batch inside the diff pass."""

    def __init__(self, latents: np.ndarray, d_sae: int, n_models: int, d_model: int, device):
        self.latents = np.asarray(latents, dtype=np.int64)
        spec = torch.as_tensor(self.latents, device=device)
        self.pos = torch.full((d_sae,), -1, dtype=torch.int64, device=device)
        self.pos[spec] = torch.arange(len(spec), device=device)
        f64 = dict(dtype=torch.float64, device=device)
        vec = (n_models, len(spec), d_model)
        self.sums = {k: torch.zeros(vec, **f64) for k in ("f_x", "f_xhat", "x", "xhat")}
        self.sums.update({k: torch.zeros(n_models, len(spec), **f64) for k in ("x_sq", "xhat_sq")})

    def update(
        self,
        rows: Int[Tensor, " nnz"],
        cols: Int[Tensor, " nnz"],
        vals: Float[Tensor, " nnz"],
        x: Float[Tensor, "batch n_models d_model"],
        x_hat: Float[Tensor, "batch n_models d_model"],
    ) -> None:
        if not len(self.latents):
            return
        pos = self.pos[cols]
        sel = pos >= 0
        r, p, f = rows[sel], pos[sel], vals[sel].double()[None, :, None]
        xs = x[r].double().transpose(0, 1)  # [n_models, nsel, d]
        xh = x_hat[r].double().transpose(0, 1)
        s = self.sums
        s["f_x"].index_add_(1, p, f * xs)
        s["f_xhat"].index_add_(1, p, f * xh)
        s["x"].index_add_(1, p, xs)
        s["xhat"].index_add_(1, p, xh)
        s["x_sq"].index_add_(1, p, (xs**2).sum(-1))
        s["xhat_sq"].index_add_(1, p, (xh**2).sum(-1))

    def result(self) -> ScalingSums | None:
        if not len(self.latents):
            return None
        return ScalingSums(self.latents, **{k: v.cpu().numpy() for k, v in self.sums.items()})


def _fit(n, s_f, s_ff, s_fy, s_y, s_yy) -> tuple[np.ndarray, np.ndarray]:
    """Chance-corrected |v|^2 and explained share of the fit y ~ a + v f (arrays over latents)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ff = s_ff - s_f**2 / n
        fy = s_fy - (s_f / n)[:, None] * s_y
        ss = s_yy - (s_y**2).sum(-1) / n
        explained = (fy**2).sum(-1) / ff
        noise = np.maximum(ss - explained, 0.0) / np.maximum(n - 2, 1) / ff
        v_sq = np.maximum(explained / ff - noise, 0.0)
        share = np.where(ss > 0, v_sq * ff / ss, np.nan)
        ok = (n >= MIN_FIRINGS) & (ff > 0)
    return np.where(ok, v_sq, np.nan), np.where(ok, share, np.nan)


def free_direction_scaling(
    sums: ScalingSums,
    w_dec: np.ndarray,
    fire_count: np.ndarray,
    act_sum: np.ndarray,
    act_sq_sum: np.ndarray,
    own: np.ndarray,
    other: np.ndarray,
    tolerance: np.ndarray,
    unit_scale: np.ndarray,
) -> dict[str, np.ndarray]:
    """The unrelated-basis fit for sums.latents (own/other/tolerance indexed like them).

    w_dec [d_sae, n_models, d] raw; fire_count, act_sum, act_sq_sum [d_sae]: n, sum f, sum f^2;
    unit_scale [n_models]: raw activation units -> the classes' units (the scaling factors)."""
    ids, rows = sums.latents, np.arange(len(sums.latents))
    n, s_f, s_ff = fire_count[ids].astype(float), act_sum[ids], act_sq_sum[ids]
    out: dict[str, np.ndarray] = {}
    for role, model in (("own", own), ("other", other)):
        v_sq, share = _fit(
            n, s_f, s_ff, sums.f_x[model, rows], sums.x[model, rows], sums.x_sq[model, rows]
        )
        out[f"signal_{role}"] = np.sqrt(v_sq) * unit_scale[model]
        out[f"share_{role}"] = share
    # the other model's reconstruction without latent j: x_hat - f_j d_j
    d = w_dec[ids, other]
    s_fy = sums.f_xhat[other, rows] - s_ff[:, None] * d
    s_y = sums.xhat[other, rows] - s_f[:, None] * d
    s_yy = (
        sums.xhat_sq[other, rows]
        - 2 * (sums.f_xhat[other, rows] * d).sum(-1)
        + s_ff * (d**2).sum(-1)
    )
    v_sq, share = _fit(n, s_f, s_ff, s_fy, s_y, s_yy)
    out["signal_rec_other"] = np.sqrt(v_sq) * unit_scale[other]
    out["share_rec_other"] = share
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ratio_act"] = out["signal_other"] / out["signal_own"]
        out["ratio_rec"] = out["signal_rec_other"] / out["signal_own"]
    flag_act = (out["ratio_act"] > tolerance) & (out["share_other"] >= MIN_SHARE)
    flag_rec = (out["ratio_rec"] > tolerance) & (out["share_rec_other"] >= MIN_SHARE)
    out["artifact"] = flag_act | flag_rec  # NaN compares False: unfitted latents are not flagged
    return out


def own_direction_scaling(
    sums: ScalingSums,
    w_dec: np.ndarray,
    act_sq_sum: np.ndarray,
    own: np.ndarray,
    other: np.ndarray,
    tolerance: np.ndarray,
    unit_scale: np.ndarray,
) -> dict[str, np.ndarray]:
    """Minder et al.'s betas along the own model's decoder vector (shared basis only)."""
    ids, rows = sums.latents, np.arange(len(sums.latents))
    q = act_sq_sum[ids]
    v = w_dec[ids, own]
    v_norm = np.linalg.norm(v, axis=-1)
    ok = (v_norm > 0) & (q > 0)
    out: dict[str, np.ndarray] = {}
    eff: dict[str, np.ndarray] = {}
    for role, model in (("own", own), ("other", other)):
        f_x, f_xhat = sums.f_x[model, rows], sums.f_xhat[model, rows]
        targets = {"err": f_x - f_xhat + q[:, None] * w_dec[ids, model], "rec": f_xhat}
        with np.errstate(divide="ignore", invalid="ignore"):
            for target, s in targets.items():
                beta = np.where(ok, (v * s).sum(-1) / (v_norm**2 * q), np.nan)
                out[f"beta_{target}_{role}"] = beta
                eff[f"{target}_{role}"] = beta * unit_scale[model]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["nu_err"] = eff["err_other"] / eff["err_own"]
        out["nu_rec"] = eff["rec_other"] / eff["rec_own"]
    out["artifact"] = (out["nu_err"] > tolerance) | (out["nu_rec"] > tolerance)
    return out
