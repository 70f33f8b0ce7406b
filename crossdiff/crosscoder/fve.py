"""Fraction of variance explained, with the right formula, in one place.

FVE_m = 1 - SSE_m / SST_m per model m, with SSE_m = sum_t ||x_tm - x_hat_tm||^2 and
SST_m = sum_t ||x_tm - mean_m||^2 accumulated over the whole evaluation set (not averaged per
token, not variance about zero); the pooled FVE adds both sums over models, and the pooled FVE in
normalized units weighs model m's sums by s_m^2. ReconstructionMeter accumulates the sums (the
crosscoder's evaluation, the diff pass); the functions turn sums into FVEs (NaN where a model's
activations have no variance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.plumbing.common import CrossdiffError


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


def fve_from_sums(sse: Any, sst: Any) -> tuple[float, np.ndarray]:
    """(pooled FVE, FVE per model) from per-model SSE and SST; NaN where SST is 0."""
    sse, sst = _numpy(sse), _numpy(sst)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_model = 1.0 - sse / np.where(sst > 0, sst, np.nan)
    pooled = 1.0 - sse.sum() / sst.sum() if sst.sum() > 0 else float("nan")
    return float(pooled), per_model


def pooled_normalized_fve(sse: Any, sst: Any, scaling_factors: Any) -> float:
    """1 - sum_m SSE_m s_m^2 / sum_m SST_m s_m^2 (models of unknown factor, NaN, left out)."""
    sse, sst = _numpy(sse), _numpy(sst)
    s2 = _numpy(scaling_factors) ** 2
    den = float(np.nansum(sst * s2))
    return 1.0 - float(np.nansum(sse * s2)) / den if den > 0 else float("nan")


class ReconstructionMeter:
    """Running sums for FVE and MSE per model (float64, so the variance is exact enough)."""

    def __init__(
        self,
        n_models: int,
        d_model: int,
        widths: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.d_model = d_model
        self.device = torch.device(device)
        # each model's own width: MSE per element and sqrt(width) normalization use it, and the
        # padding beyond it (zero for a sound store and crosscoder) is left out of every sum
        self.widths = torch.tensor(list(widths or [d_model] * n_models), dtype=torch.float64)
        self.mask = None
        if widths is not None and any(w != d_model for w in widths):
            mask = (torch.arange(d_model)[None, :] < self.widths[:, None]).to(torch.float64)
            self.mask = mask.to(self.device)
        self.n_tokens = 0
        f64 = dict(dtype=torch.float64, device=self.device)
        self.sq_error = torch.zeros(n_models, **f64)
        self.sum_x = torch.zeros(n_models, d_model, **f64)
        self.sum_sq_x = torch.zeros(n_models, **f64)
        self.sum_norm = torch.zeros(n_models, **f64)

    @torch.no_grad()
    def update(
        self,
        x: Float[Tensor, "batch n_models d_model"],
        x_hat: Float[Tensor, "batch n_models d_model"],
    ) -> None:
        x64 = x.detach().to(self.device, torch.float64)
        x_hat64 = x_hat.detach().to(self.device, torch.float64)
        if self.mask is not None:
            x64, x_hat64 = x64 * self.mask, x_hat64 * self.mask
        err = (x_hat64 - x64).pow(2).sum(dim=(0, 2))
        self.sq_error += err
        self.sum_x += x64.sum(0)
        self.sum_sq_x += x64.pow(2).sum(dim=(0, 2))
        self.sum_norm += x64.norm(dim=-1).sum(0)
        self.n_tokens += x.shape[0]

    def total_variance(self) -> Tensor:
        """sum_t ||x_tm - mean_m||^2 per model."""
        if self.n_tokens == 0:
            raise CrossdiffError("no tokens were evaluated; give at least one batch")
        return self.sum_sq_x - self.sum_x.pow(2).sum(-1) / self.n_tokens

    def fve_per_model(self) -> list[float]:
        return fve_from_sums(self.sq_error, self.total_variance())[1].tolist()

    def fve(self) -> float:
        return float(fve_from_sums(self.sq_error, self.total_variance())[0])

    def fve_pooled_normalized(self, scaling_factors: Tensor | None = None) -> float:
        """1 - sum_m SSE_m s_m^2 / sum_m SST_m s_m^2: the pooled FVE in each model's normalized
        units. Without `scaling_factors`, s_m = sqrt(width_m) / (model m's mean norm here)."""
        if scaling_factors is None:
            scaling_factors = self.scaling_factors()
        return pooled_normalized_fve(self.sq_error, self.total_variance(), scaling_factors)

    def scaling_factors(self) -> Tensor:
        """sqrt(width) / mean norm per model over the evaluated tokens (1 for a zero norm)."""
        norms = self.sum_norm.cpu() / max(self.n_tokens, 1)
        return torch.where(norms > 0, self.widths.sqrt() / norms.clamp_min(1e-30), 1.0)

    def mse_per_model(self) -> list[float]:
        """Mean squared error per element of each model's own width."""
        return (self.sq_error.cpu() / (self.n_tokens * self.widths)).tolist()
