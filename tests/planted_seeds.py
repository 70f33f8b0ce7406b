"""Planted data for the model-seed design: N "models" of architecture A and N of B, each a set of
orthonormal features written through the model's own random basis (its own orthogonal rotation)
with its own noise, as independently trained networks would. Every model that holds a feature
fires it on the same tokens. Feature sets:

    shared            in all 2N models
    a_specific        in every A model, no B model   (and b_specific likewise)
    private_a         per A model, its own features   (a seed's own, not the architecture's)
    private_b         per B model, its own features

One crosscoder over the 2N models' activations is trained with several seeds and its latents are
attributed per latent (crossdiff.analysis.architectures)."""

from __future__ import annotations

import torch

from crossdiff import CrossCoderConfig, train_crosscoder
from crossdiff.analysis.architectures import joint_fit

D_MODEL, D_SAE, K = 48, 96, 3
N_TRAIN, N_HELDOUT = 8000, 4000


def _rotation(d: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return q


def planted_seed_models(
    n: int = 3,
    *,
    shared: int = 16,
    a_specific: int = 0,
    b_specific: int = 0,
    private_a: int = 1,
    private_b: int = 1,
    density: tuple[float, float] = (0.03, 0.1),
    noise: float = 0.02,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str], list[str]]:
    """(activations [N_TRAIN + N_HELDOUT, 2n, D_MODEL], architecture per model, model names);
    models A_1..A_n then B_1..B_n."""
    g = torch.Generator().manual_seed(seed)
    total = shared + a_specific + b_specific + n * (private_a + private_b)
    if total > D_MODEL:
        raise ValueError(f"{total} planted features do not fit orthonormally in {D_MODEL} dims")
    rows = N_TRAIN + N_HELDOUT
    basis = _rotation(D_MODEL, g)
    arch = ["A"] * n + ["B"] * n
    x = torch.zeros(rows, 2 * n, D_MODEL)
    used = 0

    def plant(count: int, holders: list[int]) -> None:
        nonlocal used
        if count == 0:
            return
        feats = basis[used : used + count]
        used += count
        dens = torch.empty(count).uniform_(*density, generator=g)
        codes = (torch.rand(rows, count, generator=g) < dens) * (
            0.5 + torch.rand(rows, count, generator=g)
        )
        for m in holders:
            x[:, m] += codes @ feats

    plant(shared, list(range(2 * n)))
    plant(a_specific, list(range(n)))
    plant(b_specific, list(range(n, 2 * n)))
    for m in range(2 * n):
        plant(private_a if m < n else private_b, [m])
    out = torch.stack(
        [
            x[:, m] @ _rotation(D_MODEL, g)
            + noise * torch.randn(rows, D_MODEL, generator=g) / D_MODEL**0.5
            for m in range(2 * n)
        ],
        1,
    )
    names = [f"A{i + 1}" for i in range(n)] + [f"B{i + 1}" for i in range(n)]
    return out, arch, names


def train_joint(acts: torch.Tensor, seed: int, *, steps: int = 1500):
    """A crosscoder over every model of `acts` (training tokens), and its JointFit on the
    held-out tokens."""
    cfg = CrossCoderConfig(
        n_models=acts.shape[1], d_model=D_MODEL, d_sae=D_SAE, k=K, shared_decoder="free"
    )
    cc = train_crosscoder(
        acts[:N_TRAIN], cfg, steps=steps, batch_size=256, lr=3e-3, seed=seed, log_every=10**9
    )
    return cc, joint_fit(cc, acts[N_TRAIN:], seed=seed)
