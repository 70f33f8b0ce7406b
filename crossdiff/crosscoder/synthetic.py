"""Synthetic paired activations from a planted dictionary, and scoring a crosscoder against it.

Two models, width d_model. Planted latents are of three kinds: "shared" (fires in both models,
with its own direction in each space, or the same one when `aligned_bases`), "a_only" and
"b_only" (a direction in one model only). Each latent fires independently per token with its
density, at a magnitude in [0.5, 1.5]; model m's activation is the sum of its active latents'
directions times their magnitudes, plus Gaussian noise, times `scales[m]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.common import CrossdiffError

KINDS = ("shared", "a_only", "b_only")


@dataclass
class PlantedTruth:
    """kinds[i] is latent i's class; directions[i, m] its unit direction in model m (zeros where
    it does not exist); densities[i] its firing probability per token."""

    kinds: tuple[str, ...]
    directions: Float[Tensor, "n_latents 2 d_model"]
    densities: Float[Tensor, " n_latents"]

    def present(self) -> list[tuple[int, ...]]:
        return [{"shared": (0, 1), "a_only": (0,), "b_only": (1,)}[k] for k in self.kinds]


def _unit_directions(n: int, d: int, g: torch.Generator) -> Tensor:
    """n unit vectors in R^d: orthonormal when n <= d, random otherwise."""
    if n <= d:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        return q[:, :n].T.contiguous()
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


def planted_crosscoder_data(
    n_tokens: int,
    d_model: int,
    n_shared: int,
    n_a_only: int,
    n_b_only: int,
    *,
    aligned_bases: bool = False,
    densities: tuple[float, float] | dict[str, float] = (0.01, 0.06),
    noise: float = 0.0,
    scales: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
) -> tuple[Float[Tensor, "n_tokens 2 d_model"], PlantedTruth]:
    """Paired activations [n_tokens, 2, d_model] and the planted truth (shared latents first).

    densities: (low, high) for densities log-uniform per latent, or {kind: density}.
    noise: standard deviation of the per-token noise vector's norm (spread over d_model).
    """
    n_latents = n_shared + n_a_only + n_b_only
    if min(n_tokens, d_model, n_latents) < 1 or min(n_shared, n_a_only, n_b_only) < 0:
        raise CrossdiffError("need n_tokens, d_model >= 1, counts >= 0 and at least one latent")
    g = torch.Generator().manual_seed(seed)
    kinds = ("shared",) * n_shared + ("a_only",) * n_a_only + ("b_only",) * n_b_only
    directions = torch.zeros(n_latents, 2, d_model)
    a_idx = [i for i, k in enumerate(kinds) if k != "b_only"]
    b_idx = [i for i, k in enumerate(kinds) if k != "a_only"]
    if aligned_bases:
        basis = _unit_directions(n_latents, d_model, g)
        directions[a_idx, 0] = basis[a_idx]
        directions[b_idx, 1] = basis[b_idx]
    else:
        directions[a_idx, 0] = _unit_directions(len(a_idx), d_model, g)
        directions[b_idx, 1] = _unit_directions(len(b_idx), d_model, g)
    if isinstance(densities, dict):
        dens = torch.tensor([float(densities[k]) for k in kinds])
    else:
        low, high = (float(v) for v in densities)
        u = torch.rand(n_latents, generator=g)
        dens = torch.exp(torch.log(torch.tensor(low)) * (1 - u) + torch.log(torch.tensor(high)) * u)
    if not bool(((dens > 0) & (dens <= 1)).all()):
        raise CrossdiffError(f"densities must lie in (0, 1], got {dens.tolist()}")
    fires = torch.rand(n_tokens, n_latents, generator=g) < dens
    codes = fires * (0.5 + torch.rand(n_tokens, n_latents, generator=g))
    acts = torch.einsum("nl,lmd->nmd", codes, directions)
    if noise:
        acts += torch.randn(acts.shape, generator=g) * noise / d_model**0.5
    acts *= torch.tensor(scales, dtype=acts.dtype)[None, :, None]
    return acts, PlantedTruth(kinds=kinds, directions=directions, densities=dens)


def classify_relative_norm(
    decoder_norms: Float[Tensor, "d_sae 2"], split: tuple[float, float] = (0.3, 0.7)
) -> list[str]:
    """The paper's classes by r = ||d_B|| / (||d_A|| + ||d_B||): a_only below split[0], b_only
    above split[1], shared between (inclusive)."""
    r = decoder_norms[:, 1] / decoder_norms.sum(-1).clamp_min(1e-12)
    return [
        "a_only" if v < split[0] else "b_only" if v > split[1] else "shared" for v in r.tolist()
    ]


@torch.no_grad()
def match_planted_latents(
    W_dec: Float[Tensor, "d_sae 2 d_model"],
    decoder_norms: Float[Tensor, "d_sae 2"],
    truth: PlantedTruth,
    *,
    min_cosine: float = 0.9,
    split: tuple[float, float] = (0.3, 0.7),
    candidates: list[int] | None = None,
) -> dict[str, object]:
    """For each planted latent, the crosscoder latent whose decoder cosine is highest in the
    model(s) where the planted latent exists (worst model counts). Recovered: that cosine >=
    min_cosine. Classified right: its relative-norm class equals the planted kind.
    `candidates` restricts the search to some crosscoder latents (e.g. the designated shared)."""
    dec = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = torch.einsum("smd,lmd->lsm", dec.float(), truth.directions.float())  # [latent, sae, m]
    classes = classify_relative_norm(decoder_norms)
    allowed = torch.full((W_dec.shape[0],), candidates is None)
    if candidates is not None:
        allowed[candidates] = True
    matches = []
    for i, present in enumerate(truth.present()):
        worst = cos[i][:, list(present)].min(-1).values.masked_fill(~allowed, -2.0)
        best = int(worst.argmax())
        matches.append(
            {
                "planted": i,
                "kind": truth.kinds[i],
                "latent": best,
                "cosine": float(worst[best]),
                "class": classes[best],
            }
        )
    recovered = [m for m in matches if m["cosine"] >= min_cosine]
    right = [m for m in recovered if m["class"] == m["kind"]]
    return {
        "recovered_fraction": len(recovered) / len(matches),
        "classified_fraction": len(right) / max(1, len(recovered)),
        "matches": matches,
    }


class InMemoryStore:
    """Activations in memory behind the ActivationStore interface that training and evaluation
    use (`iter_batches`, `read_acts`, `scaling_factors`, `n_tokens`, `n_models`, `d_model`).

    Useful for tests and for users whose activations already sit in a tensor.
    """

    def __init__(
        self,
        acts: Float[Tensor, "n_tokens n_models d_model"],
        *,
        model_names: tuple[str, ...] | None = None,
        d_models: tuple[int, ...] | None = None,
    ):
        if acts.ndim != 3:
            raise CrossdiffError(
                f"acts must be [n_tokens, n_models, d_model], got {tuple(acts.shape)}"
            )
        self.acts = acts
        self.n_tokens, self.n_models, self.d_model = (int(v) for v in acts.shape)
        self.d_models = tuple(d_models or (self.d_model,) * self.n_models)
        self.model_names = tuple(model_names or [f"model_{m}" for m in range(self.n_models)])
        mean_norm = acts.float().norm(dim=-1).mean(0)
        self.scaling_factors = self.d_model**0.5 / mean_norm

    def read_acts(self, start: int, stop: int, normalize: bool = False) -> Tensor:
        acts = self.acts[start:stop].float()
        return acts * self.scaling_factors[:, None] if normalize else acts

    def iter_batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        normalize: bool = True,
        loop: bool = True,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        g = torch.Generator().manual_seed(seed)
        scale = self.scaling_factors[:, None] if normalize else torch.ones(self.n_models, 1)
        while True:
            order = (
                torch.randperm(self.n_tokens, generator=g)
                if shuffle
                else torch.arange(self.n_tokens)
            )
            stop = self.n_tokens - self.n_tokens % batch_size if loop else self.n_tokens
            for start in range(0, stop, batch_size):
                rows = order[start : start + batch_size]
                yield (self.acts[rows].float() * scale).to(device, dtype)
            if not loop:
                return
