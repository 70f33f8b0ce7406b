"""Synthetic paired activations from a planted dictionary, and scoring a crosscoder against it.

Two models, width d_model. Planted latents are of three kinds: "shared" (fires in both models,
with its own direction in each space, or the same one when `aligned_bases`), "a_only" and
"b_only" (a direction in one model only). Each latent fires independently per token with its
density, at a magnitude in [0.5, 1.5]; model m's activation is the sum of its active latents'
directions times their magnitudes, plus Gaussian noise, times `scales[m]`.

`planted_artifact_data` adds "artifact" latents: present in both models, but written in model B
through the directions of co-firing B-only latents, so a crosscoder classes them A-only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.activations.source import ActivationSource
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import DistInfo, shard_rows

KINDS = ("shared", "a_only", "b_only")


@dataclass
class PlantedTruth:
    """kinds[i] is latent i's class; directions[i, m] its unit direction in model m (zeros where
    it does not exist); densities[i] its firing probability per token."""

    kinds: tuple[str, ...]
    directions: Float[Tensor, "n_latents 2 d_model"]
    densities: Float[Tensor, " n_latents"]

    def present(self) -> list[tuple[int, ...]]:
        where = {"shared": (0, 1), "a_only": (0,), "b_only": (1,), "artifact": (0, 1)}
        return [where[k] for k in self.kinds]


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
    d_models: tuple[int, int] | None = None,
) -> tuple[Float[Tensor, "n_tokens 2 d_model"], PlantedTruth]:
    """Paired activations [n_tokens, 2, d_model] and the planted truth (shared latents first).

    densities: (low, high) for densities log-uniform per latent, or {kind: density}.
    noise: standard deviation of the per-token noise vector's norm (spread over d_model).
    d_models: models of different widths (d_model must be their maximum): model m's directions
    and noise live in its first d_models[m] coordinates, the rest is zero padding.
    """
    n_latents = n_shared + n_a_only + n_b_only
    if min(n_tokens, d_model, n_latents) < 1 or min(n_shared, n_a_only, n_b_only) < 0:
        raise CrossdiffError("need n_tokens, d_model >= 1, counts >= 0 and at least one latent")
    widths = tuple(d_models or (d_model, d_model))
    if len(widths) != 2 or max(widths) != d_model or min(widths) < 1:
        raise CrossdiffError(f"d_models={d_models} must be two widths whose maximum is d_model")
    if aligned_bases and widths[0] != widths[1]:
        raise CrossdiffError("aligned_bases needs one space: equal widths (d_models=None)")
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
        directions[a_idx, 0, : widths[0]] = _unit_directions(len(a_idx), widths[0], g)
        directions[b_idx, 1, : widths[1]] = _unit_directions(len(b_idx), widths[1], g)
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
    if noise and d_models is None:
        acts += torch.randn(acts.shape, generator=g) * noise / d_model**0.5
    elif noise:
        for m, width in enumerate(widths):
            acts[:, m, :width] += torch.randn(n_tokens, width, generator=g) * noise / width**0.5
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


class InMemoryStore(ActivationSource):
    """Activations in memory as an ActivationSource (crossdiff.activations.source): what
    training and evaluation read from a store, without per-token metadata or domains.

    Useful for tests and for users whose activations already sit in a tensor.
    """

    domain_names: tuple[str, ...] = ()
    source_label = "the InMemoryStore"
    drops_partial_batch = False
    empty_advice = "pass a tensor with at least one token"

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
        if len(set(self.d_models)) > 1:  # each model to mean norm sqrt(its own width)
            self.scaling_factors = torch.tensor(self.d_models).float().sqrt() / mean_norm
        else:
            self.scaling_factors = self.d_model**0.5 / mean_norm

    def read_acts(self, start: int = 0, stop: int | None = None, normalize: bool = False) -> Tensor:
        acts = self.acts[start : self.n_tokens if stop is None else stop].float()
        return acts * self.scaling_factors[:, None] if normalize else acts

    def read_metadata(self, start: int = 0, stop: int | None = None) -> dict[str, Tensor]:
        """No per-token metadata: an empty dict."""
        return {}

    def raw_batches(
        self, batch_size: int, *, seed: int, shuffle: bool, loop: bool, capacity: int,
        chunk_tokens: int, skip: int, part: DistInfo | None,
    ) -> Iterator[Tensor]:  # fmt: skip
        """Rows of a permutation of all tokens per pass (no shards, so no buffer or chunks);
        one pass (loop=False) ends with the partial batch."""
        g, n, step = torch.Generator().manual_seed(seed), self.n_tokens, 0
        while True:
            order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            stop = n - n % batch_size if loop else n
            for start in range(0, stop, batch_size):
                if step >= skip:
                    rows = order[start : start + batch_size]
                    yield self.acts[rows if part is None else shard_rows(rows, part)]
                step += 1
            if not loop:
                return


@dataclass
class PlantedArtifacts:
    """Where `planted_artifact_data` hid its artifacts: artifacts[i] is a planted latent that
    exists in both models; model own[i] has a direction for it, and the other model writes it
    through the directions of partners[i] (latents exclusive to that other model that fire
    whenever it fires)."""

    artifacts: list[int]
    own: list[int]
    partners: list[list[int]]


def planted_artifact_data(
    n_tokens: int,
    d_model: int,
    n_shared: int,
    n_a_only: int,
    n_b_only: int,
    n_artifacts: int,
    *,
    n_partners: int = 1,
    densities: tuple[float, float] = (0.01, 0.05),
    artifact_density: float = 0.03,
    partner_density: float = 0.15,
    seed: int = 0,
) -> tuple[Float[Tensor, "n_tokens 2 d_model"], PlantedTruth, PlantedArtifacts]:
    """Planted data whose crosscoder has known true exclusives AND known artifacts.

    Latents in order: n_shared shared, n_a_only A-only, n_b_only B-only (densities log-uniform
    in `densities`), then n_artifacts artifacts on each side (first A's, then B's), then their
    partners (n_partners each). An A-side artifact has its own direction in A; in B its direction
    is a unit combination of its partners' directions, and its partners (B-only latents, firing
    on their own with `partner_density`) fire whenever it fires. B carries the artifact's
    magnitude, but a crosscoder can reconstruct B's part with the partner latents (which fire
    far more often, so their encoders read B alone), so it tends to class the artifact A-only:
    what latent scaling should flag. B-side artifacts mirror this, so both models carry the same
    load and the scaling factors stay comparable. The defaults (one partner five times denser
    than its artifact) are where a small BatchTopK crosscoder reliably takes the artifact
    exclusive; with two partners of the same density it more often merges an artifact with a
    partner or learns it shared. Directions are orthonormal within each model
    (d_model must be at least the latents per model); magnitudes uniform in [0.5, 1.5].
    """
    n_art = 2 * n_artifacts
    n_part = n_art * n_partners
    per_model = n_shared + max(n_a_only, n_b_only) + n_art + n_part // 2
    if n_artifacts < 1 or n_partners < 1 or per_model > d_model:
        raise CrossdiffError(
            f"need n_artifacts, n_partners >= 1 and d_model >= the latents per model "
            f"({per_model}); got d_model={d_model}"
        )
    g = torch.Generator().manual_seed(seed)
    first_art = n_shared + n_a_only + n_b_only
    artifacts = list(range(first_art, first_art + n_art))
    own = [0] * n_artifacts + [1] * n_artifacts
    first_part = first_art + n_art
    partners = [
        list(range(first_part + i * n_partners, first_part + (i + 1) * n_partners))
        for i in range(n_art)
    ]
    kinds = ("shared",) * n_shared + ("a_only",) * n_a_only + ("b_only",) * n_b_only
    kinds += ("artifact",) * n_art
    kinds += tuple("b_only" if own[i] == 0 else "a_only" for i in range(n_art)
                   for _ in range(n_partners))  # fmt: skip
    n_latents = len(kinds)
    directions = torch.zeros(n_latents, 2, d_model)
    for m, exclusive in ((0, "a_only"), (1, "b_only")):
        here = [
            i for i, k in enumerate(kinds)
            if k in ("shared", exclusive) or (k == "artifact" and own[i - first_art] == m)
        ]  # fmt: skip
        directions[here, m] = _unit_directions(d_model, d_model, g)[: len(here)]
    for art, m, group in zip(artifacts, own, partners, strict=True):
        weights = 0.5 + torch.rand(len(group), generator=g)
        combo = (weights[:, None] * directions[group, 1 - m]).sum(0)
        directions[art, 1 - m] = combo / combo.norm()
    low, high = (float(v) for v in densities)
    u = torch.rand(n_latents, generator=g)
    dens = torch.exp(torch.log(torch.tensor(low)) * (1 - u) + torch.log(torch.tensor(high)) * u)
    dens[artifacts] = artifact_density
    dens[first_part:] = partner_density
    fires = torch.rand(n_tokens, n_latents, generator=g) < dens
    for art, group in zip(artifacts, partners, strict=True):
        fires[:, group] |= fires[:, [art]]
    codes = fires * (0.5 + torch.rand(n_tokens, n_latents, generator=g))
    acts = torch.einsum("nl,lmd->nmd", codes, directions)
    truth = PlantedTruth(kinds=kinds, directions=directions, densities=fires.float().mean(0))
    return acts, truth, PlantedArtifacts(artifacts=artifacts, own=own, partners=partners)
