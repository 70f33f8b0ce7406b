"""Planted data for the controls and replicates tests: four "models" (a, a2, b, b2: A, A', B, B')
made of feature sets. Every model that holds a set writes the same codes (the same tokens fire
it) through the same orthonormal features, but in its own random basis (its own orthogonal
rotation) with its own noise, as two independently trained networks would. Crosscoders are
trained on the pairs A-B, A-A', B-B' with several seeds and diffed on held-out tokens."""

from __future__ import annotations

import torch

from crossdiff import CrossCoderConfig, diff_features, train_crosscoder

D_MODEL, D_SAE, K = 32, 64, 3
N_TRAIN, N_HELDOUT = 6000, 3000
MODELS = ("a", "a2", "b", "b2")
NAMES = {"a": "dense", "a2": "dense2", "b": "moe", "b2": "moe2"}
SHARED_ONLY = {"shared": (16, (0.02, 0.08), MODELS)}


def _rotation(d: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return q


def planted_models(
    sets: dict[str, tuple[int, tuple[float, float], tuple[str, ...]]] = SHARED_ONLY,
    *,
    seed: int = 0,
    noise: float = 0.02,
) -> dict[str, torch.Tensor]:
    """model -> activations [N_TRAIN + N_HELDOUT, D_MODEL].

    sets: name -> (number of features, density range, the models that hold the set). All
    features of all sets are orthonormal (at most D_MODEL in all); densities uniform per feature.
    """
    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_HELDOUT
    basis = _rotation(D_MODEL, g)
    x = {m: torch.zeros(n, D_MODEL) for m in MODELS}
    used = 0
    for count, (lo, hi), holders in sets.values():
        feats = basis[used : used + count]
        used += count
        dens = torch.empty(count).uniform_(lo, hi, generator=g)
        fires = torch.rand(n, count, generator=g) < dens
        codes = fires * (0.5 + torch.rand(n, count, generator=g))
        for m in holders:
            x[m] += codes @ feats
    return {
        m: v @ _rotation(D_MODEL, g) + noise * torch.randn(n, D_MODEL, generator=g) / D_MODEL**0.5
        for m, v in x.items()
    }


def train_pair(models: dict[str, torch.Tensor], a: str, b: str, seed: int):
    """A crosscoder on models a and b (training tokens) with `seed`, diffed on the held-out
    tokens (model names as in NAMES)."""
    acts = torch.stack([models[a], models[b]], 1)
    cfg = CrossCoderConfig(d_model=D_MODEL, d_sae=D_SAE, k=K, shared_decoder="free")
    cc = train_crosscoder(
        acts[:N_TRAIN], cfg, steps=300, batch_size=256, lr=3e-3, seed=seed, log_every=10**9
    )
    return diff_features(
        cc, acts[N_TRAIN:], show_progress=False, batch_size=4096,
        model_names=(NAMES[a], NAMES[b]), latent_scaling=False,
    )  # fmt: skip


def three_pairs(models: dict[str, torch.Tensor], seeds: tuple[int, ...]):
    """(main, control_a, control_b): lists of diffs, one per seed."""
    main = [train_pair(models, "a", "b", s) for s in seeds]
    ctrl_a = [train_pair(models, "a", "a2", s) for s in seeds]
    ctrl_b = [train_pair(models, "b", "b2", s) for s in seeds]
    return main, ctrl_a, ctrl_b
