"""Per-model activation statistics and the scaling factor that brings mean norm to sqrt(d_model).

Training on scaled activations x'_m = s_m * x_m (s_m = sqrt(d_m) / E||x_m||, SAELens's convention)
puts both models on one scale. The crosscoder folds s_m into its weights
(`CrossCoder.fold_scaling_factors`), so a trained crosscoder takes and returns raw activations.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.plumbing.common import CrossdiffError


class RunningStats:
    """Exact float64 running sums per model: token count, sum of norms, sum and sum of squares.

    Sums merge by addition, so statistics over shards written in separate runs (resume, append)
    equal those of a single run over the same shards in the same order.
    """

    def __init__(self, widths: list[int]) -> None:
        self.widths = list(widths)
        self.count = torch.zeros(len(widths), dtype=torch.float64)
        self.norm_sum = torch.zeros(len(widths), dtype=torch.float64)
        self.sums = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.sumsqs = [torch.zeros(w, dtype=torch.float64) for w in widths]

    def update(self, acts: Float[Tensor, "n n_models d"]) -> None:
        for m, width in enumerate(self.widths):
            x = acts[:, m, :width].to(torch.float64)
            self.count[m] += x.shape[0]
            self.norm_sum[m] += x.norm(dim=-1).sum()
            self.sums[m] += x.sum(dim=0)
            self.sumsqs[m] += (x * x).sum(dim=0)

    def add(self, other: RunningStats) -> None:
        """Add `other`'s sums to these (the statistics of both sets of tokens together)."""
        if other.widths != self.widths:
            raise CrossdiffError(f"cannot add statistics of widths {other.widths} to {self.widths}")
        self.count += other.count
        self.norm_sum += other.norm_sum
        for m in range(len(self.widths)):
            self.sums[m] += other.sums[m]
            self.sumsqs[m] += other.sumsqs[m]

    def mean_norms(self) -> Tensor:
        return self.norm_sum / self.count.clamp(min=1)

    def scaling_factors(self) -> Tensor:
        widths = torch.tensor(self.widths, dtype=torch.float64)
        norms = self.mean_norms()
        factors = torch.where(norms > 0, widths.sqrt() / norms.clamp(min=1e-30), torch.ones(1))
        return factors

    def mean(self, m: int) -> Tensor:
        return self.sums[m] / max(float(self.count[m]), 1.0)

    def std(self, m: int) -> Tensor:
        mean = self.mean(m)
        var = self.sumsqs[m] / max(float(self.count[m]), 1.0) - mean * mean
        return var.clamp(min=0).sqrt()

    def to_tensors(self) -> dict[str, Tensor]:
        tensors = {"count": self.count, "norm_sum": self.norm_sum}
        for m in range(len(self.widths)):
            tensors[f"sum.{m}"] = self.sums[m]
            tensors[f"sumsq.{m}"] = self.sumsqs[m]
            tensors[f"mean.{m}"] = self.mean(m)
            tensors[f"std.{m}"] = self.std(m)
        return {k: v.contiguous() for k, v in tensors.items()}

    @classmethod
    def from_tensors(cls, widths: list[int], tensors: dict[str, Tensor]) -> RunningStats:
        stats = cls(widths)
        stats.count = tensors["count"].clone()
        stats.norm_sum = tensors["norm_sum"].clone()
        stats.sums = [tensors[f"sum.{m}"].clone() for m in range(len(widths))]
        stats.sumsqs = [tensors[f"sumsq.{m}"].clone() for m in range(len(widths))]
        return stats

    def summary(self, model_names: list[str]) -> list[dict[str, float | int | str]]:
        norms, factors = self.mean_norms(), self.scaling_factors()
        return [
            {
                "name": name,
                "width": self.widths[m],
                "n_tokens": int(self.count[m]),
                "mean_norm": float(norms[m]),
                "scaling_factor": float(factors[m]),
            }
            for m, name in enumerate(model_names)
        ]


def scaling_factor(mean_norm: float, width: int) -> float:
    return math.sqrt(width) / mean_norm if mean_norm > 0 else 1.0
