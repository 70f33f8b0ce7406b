"""Crosscoder seeds: one-to-one matching of two crosscoders' latents, and what moves between seeds.

A run gives one number per class from one crosscoder; another crosscoder seed on the same
activations gives another. `replicate_summary` lays the seeds side by side (class counts, FVE,
each claim's effect and verdict, with mean, sd, min and max) and measures how many latents of each
class come back, with the same class, in every other seed.

Matching (`match_latents`). Both crosscoders read the same models, so a latent's decoder vector
for model m can be compared across the two crosscoders in m's own space. The similarity of two
latents is the minimum, over the models where BOTH latents write with non-negligible norm, of
their per-model cosines. "Non-negligible" is at least PRESENCE (a quarter) of the latent's
largest per-model norm, in the crosscoder's normalized units. Why not the minimum over all
models: an exclusive latent's vector in its absent model is near zero and trained by little
signal, so its direction is noise, and a minimum over it would veto the match of two copies of
the same exclusive feature. Why a quarter: at the paper's split (0.3 / 0.7) a shared latent's
weaker norm is at least 0.43 of its stronger one, so every shared latent counts both models,
and a latent whose weaker side is under a quarter is exclusive by any usual split. Two latents
with no model in common (one A-only, one B-only) do not match. A feature that is A-only in one
seed and shared in the other matches by its A vector; whether it kept its class is what the
stability figure asks.

One-to-one by greedy assignment on candidate pairs in descending similarity: each latent keeps
its TOP_CANDIDATES most similar partners above min_cosine (computed in chunks, so memory stays
at chunk x d_sae), and a pair is taken when both are still free. Above a cosine of 0.7 a latent
rarely has two plausible partners, so greedy and Hungarian agree on almost every pair, and
greedy scales to 25k latents where a dense 25k x 25k assignment does not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int

from crossdiff.analysis.classes import DEAD
from crossdiff.common import CrossdiffError

PRESENCE = 0.25
TOP_CANDIDATES = 8
_CHUNK = 512


def _decoder(cc: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit decoder vectors [d_sae, n_models, d_model], presence [d_sae, n_models])."""
    w = getattr(cc, "W_dec", None)
    if w is None or w.ndim != 3:
        raise CrossdiffError(
            "match_latents needs crosscoders with W_dec [d_sae, n_models, d_model]; got "
            f"{type(cc).__name__} with W_dec of shape {None if w is None else tuple(w.shape)}"
        )
    w = w.detach().float().cpu()
    norms = cc.decoder_norms().detach().float().cpu() if hasattr(cc, "decoder_norms") else None
    if norms is None:
        norms = w.norm(dim=-1)
    unit = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    top = norms.max(dim=-1, keepdim=True).values
    present = (norms >= PRESENCE * top) & (top > 0)
    return unit, present


def _candidates(
    ref: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor],
    rows: np.ndarray, cols: np.ndarray, min_cosine: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(ref index, other index, similarity) of each ref latent's best partners >= min_cosine."""
    (u_r, p_r), (u_o, p_o) = ref, other
    u_o, p_o = u_o[cols], p_o[cols]
    keep = min(TOP_CANDIDATES, len(cols))
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(rows), _CHUNK):
        ids = rows[start : start + _CHUNK]
        cos = torch.einsum("imd,jmd->ijm", u_r[ids], u_o)
        both = p_r[ids][:, None, :] & p_o[None, :, :]
        sim = torch.where(both, cos, torch.inf).min(dim=-1).values
        sim = torch.where(both.any(-1), sim, -torch.inf)
        best, where = sim.topk(keep, dim=1)
        ok = best >= min_cosine
        out_i.append(np.repeat(ids, keep).reshape(-1, keep)[ok.numpy()])
        out_j.append(cols[where[ok].numpy()])
        out_s.append(best[ok].numpy())
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def match_latents(
    cc_ref: Any,
    cc_other: Any,
    *,
    min_cosine: float = 0.7,
    ref_live: Bool[np.ndarray, " d_sae"] | None = None,
    other_live: Bool[np.ndarray, " d_sae_other"] | None = None,
) -> Int[np.ndarray, " d_sae"]:
    """For each latent of cc_ref, the index of its one-to-one match in cc_other, or -1.

    Similarity: the minimum per-model decoder cosine over the models where both latents write
    (see the module docstring); a match needs at least `min_cosine`. ref_live / other_live:
    latents to consider (e.g. the non-dead ones of a diff); default every latent with a nonzero
    decoder. The two crosscoders must read the same number of models at the same width.
    """
    if not -1.0 <= min_cosine <= 1.0:
        raise CrossdiffError(f"min_cosine={min_cosine} must be a cosine in [-1, 1], e.g. 0.7")
    ref, other = _decoder(cc_ref), _decoder(cc_other)
    if ref[0].shape[1:] != other[0].shape[1:]:
        raise CrossdiffError(
            f"the crosscoders read different models: W_dec {tuple(ref[0].shape)} vs "
            f"{tuple(other[0].shape)}; match crosscoders trained on the same activations"
        )
    rows = _live(ref, ref_live, "ref_live")
    cols = _live(other, other_live, "other_live")
    match = np.full(ref[0].shape[0], -1, dtype=np.int64)
    if not len(rows) or not len(cols):
        return match
    i, j, s = _candidates(ref, other, rows, cols, min_cosine)
    taken = np.zeros(other[0].shape[0], dtype=bool)
    for k in np.argsort(-s, kind="stable"):
        if match[i[k]] < 0 and not taken[j[k]]:
            match[i[k]] = j[k]
            taken[j[k]] = True
    return match


def _live(dec: tuple[torch.Tensor, torch.Tensor], live: np.ndarray | None, name: str) -> np.ndarray:
    has_vector = dec[1].any(-1).numpy()
    if live is None:
        return np.nonzero(has_vector)[0]
    live = np.asarray(live, dtype=bool)
    if live.shape != has_vector.shape:
        raise CrossdiffError(f"{name} must have one entry per latent ({len(has_vector)})")
    return np.nonzero(live & has_vector)[0]


def spread(values: list[float | int | None]) -> dict[str, Any]:
    """values, mean, sd (n - 1), min and max of one figure over seeds (None where missing)."""
    known = [float(v) for v in values if v is not None]
    out: dict[str, Any] = {"values": list(values), "mean": None, "sd": None}
    out.update(min=min(known) if known else None, max=max(known) if known else None)
    if known:
        out["mean"] = float(np.mean(known))
    if len(known) >= 2:
        out["sd"] = float(np.std(known, ddof=1))
    return out


def _per_seed(diff: Any, seed: int) -> dict[str, Any]:
    s = diff.summary
    rec = s["reconstruction"]
    return {
        "seed": seed,
        "class_counts": {k: int(v) for k, v in s["class_counts"].items()},
        "fve": _num(rec.get("fve")),
        "fve_per_model": {k: _num(v) for k, v in rec["fve_per_model"].items()},
        "claims": {
            c["key"]: {
                "effect": _num(c["effect"]),
                "ci": None if c["ci"] is None else [float(x) for x in c["ci"]],
                "verdict": c["verdict"],
            }
            for c in s["claims"]
        },
    }


def _num(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def check_diffs(diffs: list[Any], what: str) -> tuple[str, str]:
    """The (A, B) names every diff of a list shares; errors for an empty or mixed list."""
    if not isinstance(diffs, list | tuple) or not diffs:
        raise CrossdiffError(f"{what} must be a non-empty list of FeatureDiff (one per seed)")
    pairs = {(d.summary["direction"]["A"], d.summary["direction"]["B"]) for d in diffs}
    if len(pairs) > 1:
        raise CrossdiffError(
            f"the diffs of {what} have different directions {sorted(pairs)}; every seed of one "
            "pair must use the same (A, B) models"
        )
    return next(iter(pairs))


def _stability(diffs: list[Any], min_cosine: float) -> dict[str, Any]:
    """Per class: the share of seed i's latents with a same-class match in every other seed."""
    tables = [d.table["class"].to_numpy().astype(str) for d in diffs]
    classes = [c for c in diffs[0].summary["classes"] if c != DEAD]
    stable = [{c: np.ones((t == c).sum(), dtype=bool) for c in classes} for t in tables]
    for i, di in enumerate(diffs):
        for j, dj in enumerate(diffs):
            if i == j:
                continue
            m = match_latents(
                di.crosscoder, dj.crosscoder, min_cosine=min_cosine,
                ref_live=tables[i] != DEAD, other_live=tables[j] != DEAD,
            )  # fmt: skip
            partner = np.where(m >= 0, tables[j][np.maximum(m, 0)], "")
            for c in classes:
                stable[i][c] &= partner[tables[i] == c] == c
    per_class = {}
    for c in classes:
        n = [int(len(s[c])) for s in stable]
        kept = [int(s[c].sum()) for s in stable]
        frac = [k / m if m else None for k, m in zip(kept, n, strict=True)]
        per_class[c] = {"n": n, "stable": kept, "fraction": spread(frac)}
    return per_class


def replicate_summary(
    diffs: list[Any], seeds: list[int], *, min_cosine: float = 0.7
) -> dict[str, Any]:
    """Seeds of one pair side by side: per-seed figures, their spread, and class stability.

    diffs: one FeatureDiff per crosscoder seed (same models, same direction); seeds: their
    seeds, in the same order. Stability needs at least two seeds and each diff's crosscoder.
    """
    if len(diffs) != len(seeds):
        raise CrossdiffError(f"{len(diffs)} diffs but {len(seeds)} seeds; give one seed per diff")
    name_a, name_b = check_diffs(diffs, "diffs")
    if len(set(seeds)) != len(seeds):
        raise CrossdiffError(f"seeds {list(seeds)} repeat a seed; each diff needs its own")
    per_seed = [_per_seed(d, int(s)) for d, s in zip(diffs, seeds, strict=True)]
    classes = list(diffs[0].summary["classes"])
    models = list(per_seed[0]["fve_per_model"])
    keys = list(per_seed[0]["claims"])
    figures = {
        "class_counts": {c: spread([p["class_counts"].get(c) for p in per_seed]) for c in classes},
        "fve": spread([p["fve"] for p in per_seed]),
        "fve_per_model": {m: spread([p["fve_per_model"].get(m) for p in per_seed]) for m in models},
        "claim_effects": {k: spread([p["claims"][k]["effect"] for p in per_seed]) for k in keys},
    }
    verdicts = {k: _tally([p["claims"][k]["verdict"] for p in per_seed]) for k in keys}
    out: dict[str, Any] = {
        "n_seeds": len(diffs),
        "seeds": [int(s) for s in seeds],
        "direction": {"A": name_a, "B": name_b},
        "per_seed": per_seed,
        "figures": figures,
        "verdict_counts": verdicts,
        "min_cosine": float(min_cosine),
        "stability": None,
        "stable_exclusive": None,
        "note": None,
        "method": _METHOD,
    }
    if len(diffs) < 2:
        out["note"] = "one seed: no spread (sd is None) and no stability; train more seeds"
    elif any(d.crosscoder is None for d in diffs):
        out["note"] = "a diff has no crosscoder (loaded from JSON?), so stability is not measured"
    else:
        out["stability"] = _stability(diffs, min_cosine)
        out["stable_exclusive"] = {
            c: spread(out["stability"][c]["stable"]) for c in (f"{name_a}-only", f"{name_b}-only")
        }
        out["seed_stability"] = _seed_stability(diffs)
    return out


def _seed_stability(diffs: list[Any]) -> dict[str, Any]:
    """Hungarian seed stability of the first diff's crosscoder against the others' (per class of
    the first), and its per-latent columns added to the first diff's table: `seed_match` (the
    worst matched cosine over the other seeds) and `stable` (>= the stable cosine in every one)."""
    from crossdiff.analysis.stability import seed_stability

    labels = [d.table["class"].to_numpy().astype(str) for d in diffs]
    out = seed_stability(
        [d.crosscoder for d in diffs], live=[t != DEAD for t in labels], classes=labels[0]
    )
    per_latent = out.pop("per_latent")
    diffs[0].table["seed_match"] = per_latent["worst_match"]
    diffs[0].table["stable"] = per_latent["stable"]
    return out


def _tally(verdicts: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in verdicts:
        out[v] = out.get(v, 0) + 1
    return out


_METHOD = (
    "per seed: the diff's own class counts, FVE and claims; mean, sd (n - 1), min and max over "
    "seeds; stability of a class: the fraction of one seed's latents of that class whose "
    "one-to-one decoder match (minimum per-model cosine over the models both latents write to, "
    "at least min_cosine) is of the same class in every other seed, per seed and its spread; "
    "stable_exclusive: those counts for the two exclusive classes, per seed"
)
