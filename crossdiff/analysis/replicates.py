"""Crosscoder seeds: one-to-one matching of two crosscoders' latents, and what moves between seeds.

A run gives one number per class from one crosscoder; another crosscoder seed on the same
activations gives another. `replicate_summary` lays the seeds side by side (class counts, FVE,
each claim's effect and verdict, with mean, sd, min and max) and measures how many latents of each
class come back, with the same class, in every other seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from crossdiff.analysis.classes import DEAD
from crossdiff.analysis.matching import match_latents
from crossdiff.plumbing.common import CrossdiffError


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
    # the report's headline list: the stable latents of each class, exclusive classes first
    order = sorted(set(labels[0]) - {DEAD}, key=lambda c: (not c.endswith("-only"), c))
    out["stable_by_class"] = {
        c: [int(i) for i in np.nonzero(per_latent["stable"] & (labels[0] == c))[0]] for c in order
    }
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
