"""Standard crosscoder vs Dedicated Feature Crosscoder on planted truth: the data, the training
at equal dictionary size and k, and the scores (recall and precision of planted exclusive
features, FVE, L0, seed stability, false exclusives on a same-features null). What
benchmarks/dfc_planted.py prints and tests/test_dfc.py asserts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.crosscoder.synthetic import PlantedTruth, _unit_directions

D_MODEL, D_SAE, K = 64, 64, 3
N_SHARED, N_EXCLUSIVE = 32, 16  # planted features: shared, and exclusive per model
MIN_COSINE = 0.9  # a planted feature is recovered by a latent this close in its model
STABLE_COSINE = 0.7  # a latent matched across seeds (Hungarian matching on decoder cosine)


def planted_pairs(
    *, n_shared: int = N_SHARED, n_exclusive: int = N_EXCLUSIVE, n_tokens: int = 20000,
    d_model: int = D_MODEL, seed: int = 0,
) -> tuple[Float[Tensor, "n_tokens 2 d_model"], PlantedTruth]:  # fmt: skip
    """Two models' activations from n_shared shared and n_exclusive A-only and B-only features
    (orthonormal in each model, each model its own basis), densities log-uniform in
    [0.01, 0.06], magnitudes in [0.5, 1.5], small noise. n_exclusive=0 is a same-features null."""
    g = torch.Generator().manual_seed(seed)
    kinds = ("shared",) * n_shared + ("a_only",) * n_exclusive + ("b_only",) * n_exclusive
    n = len(kinds)
    dirs = torch.zeros(n, 2, d_model)
    in_a = [i for i, k in enumerate(kinds) if k != "b_only"]
    in_b = [i for i, k in enumerate(kinds) if k != "a_only"]
    dirs[in_a, 0] = _unit_directions(len(in_a), d_model, g)
    dirs[in_b, 1] = _unit_directions(len(in_b), d_model, g)
    u = torch.rand(n, generator=g)
    dens = torch.exp(np.log(0.01) * (1 - u) + np.log(0.06) * u)
    fires = torch.rand(n_tokens, n, generator=g) < dens
    codes = fires * (0.5 + torch.rand(n_tokens, n, generator=g))
    acts = torch.einsum("nl,lmd->nmd", codes, dirs)
    acts += 0.02 * torch.randn(acts.shape, generator=g) / d_model**0.5
    return acts, PlantedTruth(kinds=kinds, directions=dirs, densities=fires.float().mean(0))


def exclusive_owner(cc: Any, split: tuple[float, float] = (0.3, 0.7)) -> np.ndarray:
    """Per latent: 0 / 1 when classed exclusive to model A / B, -1 otherwise (a DFC: by its
    partition; a standard crosscoder: by relative decoder norm at `split`)."""
    if cc.cfg.partition is not None:
        return np.asarray(cc.cfg.latent_owner())
    norms = cc.decoder_norms().float()
    r = (norms[:, 1] / norms.sum(-1).clamp_min(1e-12)).numpy()
    return np.where(r < split[0], 0, np.where(r > split[1], 1, -1))


@torch.no_grad()
def score_exclusive(cc: Any, truth: PlantedTruth, acts: Tensor) -> dict[str, float]:
    """recall: planted exclusive features with a latent of decoder cosine >= MIN_COSINE in their
    model that is classed exclusive to that model; precision: live latents classed exclusive
    whose decoder matches a planted feature exclusive to that model at >= MIN_COSINE."""
    w = cc.W_dec.detach().float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    owner = exclusive_owner(cc)
    live = (cc.encode(acts) > 0).any(0).numpy()
    hits, total, good, claimed = 0, 0, 0, 0
    for m, kind in ((0, "a_only"), (1, "b_only")):
        planted = [i for i, k in enumerate(truth.kinds) if k == kind]
        if planted:
            cos = w[:, m] @ truth.directions[planted, m].T  # [d_sae, n_planted]
            ok = (cos >= MIN_COSINE) & torch.as_tensor(owner == m)[:, None]
            hits += int(ok.any(0).sum())
            total += len(planted)
        mine = (owner == m) & live
        claimed += int(mine.sum())
        if planted and mine.any():
            good += int((cos[torch.as_tensor(mine)] >= MIN_COSINE).any(1).sum())
    return {
        "recall": hits / total if total else float("nan"),
        "precision": good / claimed if claimed else float("nan"),
        "n_claimed_exclusive": claimed,
    }


def seed_stability(cc_a: Any, cc_b: Any) -> float:
    """Share of latents matched one-to-one across two crosscoders (Hungarian matching on the
    cosine of their concatenated decoders) at cosine >= STABLE_COSINE."""
    from scipy.optimize import linear_sum_assignment

    def unit(cc: Any) -> Tensor:
        w = cc.W_dec.detach().float().flatten(1)
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    cos = (unit(cc_a) @ unit(cc_b).T).numpy()
    rows, cols = linear_sum_assignment(-cos)
    return float((cos[rows, cols] >= STABLE_COSINE).sum() / cos.shape[0])


def _mean(values: list[float] | list[int]) -> float:
    """The mean of the finite values (NaN when there are none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def planted_exclusive_recall(
    *, seeds: tuple[int, ...] = (0, 1), steps: int = 1500, partition: tuple[int, int] = (16, 16),
    null: bool = False,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """architecture -> mean over seeds of recall, precision, FVE, L0 (and seed stability across
    the first two seeds), standard vs DFC at d_sae D_SAE and k K on `planted_pairs` (the
    same-features null when `null`: every planted feature shared)."""
    from crossdiff.crosscoder.config import CrossCoderConfig
    from crossdiff.crosscoder.metrics import evaluate_crosscoder
    from crossdiff.crosscoder.train import train_crosscoder

    kw = {"n_shared": N_SHARED + 2 * N_EXCLUSIVE, "n_exclusive": 0} if null else {}
    acts, truth = planted_pairs(seed=0, **kw)
    train, held = acts[:16000], acts[16000:]
    out: dict[str, dict[str, float]] = {}
    for name, part in (("standard", None), ("dfc", partition)):
        rows, ccs = [], []
        for seed in seeds:
            cfg = CrossCoderConfig(d_model=D_MODEL, d_sae=D_SAE, k=K, partition=part)
            cc = train_crosscoder(
                train, cfg, steps=steps, batch_size=256, lr=3e-3, seed=seed, log_every=10**9
            )
            ev = evaluate_crosscoder(cc, held)
            rows.append({**score_exclusive(cc, truth, held), "fve": ev["fve"], "l0": ev["l0"]})
            ccs.append(cc)
        out[name] = {key: _mean([r[key] for r in rows]) for key in rows[0]}
        if len(ccs) > 1:
            out[name]["seed_stability"] = seed_stability(ccs[0], ccs[1])
    return out
