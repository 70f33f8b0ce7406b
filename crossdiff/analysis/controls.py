"""The paper's three claims beyond same-architecture controls.

Two transformers of one architecture trained from different seeds also disagree, and so do two
crosscoder seeds, so part of any "exclusive latent" count, and of any density difference, is
noise. A dense-vs-MoE difference is a finding only beyond what the same-architecture pairs
(A vs A', B vs B', same settings) produce. `compare_with_controls` takes the seeds of three
pairs (main: A vs B; control_a: A vs A'; control_b: B vs B') and returns, per pair, the
exclusive counts per side, median densities and FVE, and the claims beyond the controls:

1. b_fewer_unique: excess_A = mean A-only count in main - mean per-side exclusive count in the
   A-A' control (per side: the mean of its two exclusive classes); excess_B likewise with B-B'.
   Effect: excess_A - excess_B; the claim holds beyond controls when its interval is above 0.
2. b_denser_than_shared: mean over main seeds of Cliff's delta (B-only vs shared densities) minus
   the mean over B-B' seeds of Cliff's delta (both exclusive classes pooled vs shared); holds
   when the interval is above 0.
3. a_sparser_than_shared: as 2 with A-only and the A-A' control; holds when below 0.

Intervals: percentile bootstrap. Claim 1 resamples seeds within each pair (with replacement) and
draws each chosen seed's counts from a Poisson around the observed counts; with one seed it is
the Poisson interval alone. The Poisson step adds counting noise on top of the seed spread that
already contains it, so the interval errs wide: the safe side for a claim of a difference.
Claims 2 and 3 resample seeds within each pair and, for each chosen seed, one latent-level
bootstrap replicate of its delta (latents resampled within each class). A verdict needs at least
`min_seeds` seeds in each pair involved (one seed measures no seed noise: "cannot tell"), and for
claims 2 and 3 at least `min_n` latents in each compared class of every seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crossdiff.analysis.claims import MIN_N
from crossdiff.analysis.classes import DESIGNATED, SHARED
from crossdiff.analysis.replicates import check_diffs, spread
from crossdiff.analysis.stats import CI_LEVEL, N_RESAMPLES, SEED, cliffs_delta_resamples
from crossdiff.analysis.stats import cliffs_delta as _delta
from crossdiff.common import CrossdiffError

MIN_SEEDS = 2
HOLDS = "holds beyond controls"
DOES_NOT_HOLD = "does not hold beyond controls"
CANNOT_TELL = "cannot tell"
VERDICTS = (HOLDS, DOES_NOT_HOLD, CANNOT_TELL)
ROLES = ("main", "control_a", "control_b")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _ci(samples: np.ndarray) -> list[float]:
    tail = (1.0 - CI_LEVEL) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return [float(lo), float(hi)]


def _labels(diff: Any) -> np.ndarray:
    return diff.table["class"].to_numpy().astype(str)


def _densities(diff: Any, cls: str | tuple[str, ...]) -> np.ndarray:
    wanted = (cls,) if isinstance(cls, str) else cls
    return diff.table["density"].to_numpy(dtype=np.float64)[np.isin(_labels(diff), wanted)]


def _pair(diffs: list[Any], role: str) -> dict[str, Any]:
    """Per-seed and mean exclusive counts per side, median densities and FVE of one pair."""
    a, b = check_diffs(diffs, role)
    cls_a, cls_b = f"{a}-only", f"{b}-only"
    counts = {c: [int(d.summary["class_counts"].get(c, 0)) for d in diffs] for c in (cls_a, cls_b)}
    per_side = [(x + y) / 2 for x, y in zip(counts[cls_a], counts[cls_b], strict=True)]
    dens: dict[str, Any] = {}
    for name, cls in ((cls_a, cls_a), (cls_b, cls_b), (SHARED, (SHARED, DESIGNATED))):
        meds = [_densities(d, cls) for d in diffs]
        dens[name] = spread([float(np.median(v)) if len(v) else None for v in meds])
    recs = [d.summary["reconstruction"] for d in diffs]
    return {
        "A": a,
        "B": b,
        "n_seeds": len(diffs),
        "d_sae": int(diffs[0].summary["d_sae"]),
        "exclusive": {
            cls_a: spread(counts[cls_a]),
            cls_b: spread(counts[cls_b]),
            "per_side": spread(per_side),
        },  # fmt: skip
        "density_median": dens,
        "fve": spread([r.get("fve") for r in recs]),
        "fve_per_model": {
            m: spread([r["fve_per_model"].get(m) for r in recs]) for m in recs[0]["fve_per_model"]
        },
    }


def _check_roles(main: list, control_a: list, control_b: list) -> tuple[str, str]:
    a, b = check_diffs(main, "main")
    for role, diffs, name in (("control_a", control_a, a), ("control_b", control_b, b)):
        pair = check_diffs(diffs, role)
        if name not in pair:
            raise CrossdiffError(
                f"{role} pairs {pair}, which does not include {name!r}: control_a must pair the "
                f"main pair's A ({a!r}) with its other seed, control_b the main pair's B ({b!r})"
            )
    widths = {int(d.summary["d_sae"]) for d in (*main, *control_a, *control_b)}
    if len(widths) > 1:
        raise CrossdiffError(
            f"the crosscoders have different d_sae {sorted(widths)}; a control counts latents "
            "only when it uses the main pair's settings: train every pair with one d_sae and k"
        )
    return a, b


def _seed_draws(rng: np.random.Generator, n_seeds: int, n: int) -> np.ndarray:
    """[n, n_seeds] seed indices: resampled with replacement, or the seeds themselves when one."""
    if n_seeds == 1:
        return np.zeros((n, 1), dtype=np.int64)
    return rng.integers(0, n_seeds, size=(n, n_seeds))


def _count_resamples(counts: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] resampled mean count: seeds resampled, then Poisson around each chosen seed's count.
    counts: [n_seeds, n_sides]; the sides are averaged (per-side count)."""
    idx = _seed_draws(rng, counts.shape[0], n)
    drawn = rng.poisson(counts[idx].astype(np.float64))  # [n, n_seeds, n_sides]
    return drawn.mean(axis=(1, 2))


def _claim_counts(pairs: dict[str, Any], names: dict[str, str], n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    a, b = names["A"], names["B"]
    main_a = np.array(pairs["main"]["exclusive"][f"{a}-only"]["values"])[:, None]
    main_b = np.array(pairs["main"]["exclusive"][f"{b}-only"]["values"])[:, None]
    ctrl = {}
    for role in ("control_a", "control_b"):
        p = pairs[role]
        ctrl[role] = np.stack(
            [np.array(p["exclusive"][f"{p[s]}-only"]["values"]) for s in ("A", "B")], 1
        )
    # main's two sides come from one crosscoder per seed: resample them together
    idx = _seed_draws(rng, main_a.shape[0], n)
    res_a = rng.poisson(main_a[idx, 0].astype(np.float64)).mean(1)
    res_b = rng.poisson(main_b[idx, 0].astype(np.float64)).mean(1)
    res_ca = _count_resamples(ctrl["control_a"], rng, n)
    res_cb = _count_resamples(ctrl["control_b"], rng, n)
    excess_a = float(main_a.mean() - ctrl["control_a"].mean())
    excess_b = float(main_b.mean() - ctrl["control_b"].mean())
    return {
        "effect": excess_a - excess_b,
        "ci": _ci((res_a - res_ca) - (res_b - res_cb)),
        "components": {
            f"excess_{a}": {"value": excess_a, "ci": _ci(res_a - res_ca)},
            f"excess_{b}": {"value": excess_b, "ci": _ci(res_b - res_cb)},
        },
    }


def _delta_arm(
    diffs: list[Any], group: tuple[str, ...], min_n: int, n: int, seed: int
) -> dict[str, Any]:
    """Per-seed Cliff's delta of `group` vs shared densities, and [n_seeds, n] resamples (None
    when a seed has fewer than min_n latents in either class)."""
    ref = (SHARED, DESIGNATED)
    sizes = [(len(_densities(d, group)), len(_densities(d, ref))) for d in diffs]
    deltas = [
        _delta(_densities(d, group), _densities(d, ref)) if min(s) else None
        for d, s in zip(diffs, sizes, strict=True)
    ]
    enough = all(min(s) >= min_n for s in sizes)
    reps = None
    if enough:
        reps = np.stack([
            cliffs_delta_resamples(_densities(d, group), _densities(d, ref), n_resamples=n,
                                   seed=seed + i)
            for i, d in enumerate(diffs)
        ])  # fmt: skip
    return {"per_seed": deltas, "n_per_seed": [list(s) for s in sizes], "enough": enough,
            "reps": reps}  # fmt: skip


def _arm_resamples(reps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n] mean delta over resampled seeds, each with one of its latent-bootstrap replicates."""
    n_seeds, n = reps.shape
    idx = _seed_draws(rng, n_seeds, n)
    return reps[idx, rng.integers(0, n, size=idx.shape)].mean(1)


def _claim_density(
    main: list[Any], control: list[Any], group: str, min_n: int, n: int, seed: int
) -> dict[str, Any]:
    ctrl_a, ctrl_b = check_diffs(control, "control")
    m = _delta_arm(main, (group,), min_n, n, seed)
    c = _delta_arm(control, (f"{ctrl_a}-only", f"{ctrl_b}-only"), min_n, n, seed + 1000)
    known_m = [x for x in m["per_seed"] if x is not None]
    known_c = [x for x in c["per_seed"] if x is not None]
    out: dict[str, Any] = {
        "effect": None,
        "ci": None,
        "enough_latents": m["enough"] and c["enough"],
    }
    if known_m and known_c:
        out["effect"] = float(np.mean(known_m) - np.mean(known_c))
    if out["enough_latents"]:
        rng = np.random.default_rng(seed)
        out["ci"] = _ci(_arm_resamples(m["reps"], rng) - _arm_resamples(c["reps"], rng))
    out["components"] = {
        "main_delta": {"per_seed": m["per_seed"], "mean": _mean(known_m),
                       "n_per_seed": m["n_per_seed"]},
        "control_delta": {"per_seed": c["per_seed"], "mean": _mean(known_c),
                          "n_per_seed": c["n_per_seed"]},
    }  # fmt: skip
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _verdict(res: dict[str, Any], side: str, n_seeds: int, min_seeds: int) -> tuple[str, str]:
    if n_seeds < min_seeds:
        return CANNOT_TELL, (
            f"{n_seeds} seed(s) in the smallest pair; at least {min_seeds} are needed to measure "
            "crosscoder-seed noise"
        )
    if res["ci"] is None:
        return CANNOT_TELL, "too few latents in a compared class of some seed"
    lo, hi = res["ci"]
    beyond = lo > 0 if side == "greater" else hi < 0
    return (HOLDS, "") if beyond else (DOES_NOT_HOLD, "")


def _specs(a: str, b: str, ca: str, cb: str) -> list[dict[str, Any]]:
    return [
        {"key": "b_fewer_unique", "side": "greater",
         "claim": f"The {b} model learns fewer unique features than the {a} model",
         "effect_name": f"excess_{a} - excess_{b} (exclusive latents beyond each control)",
         "pairs": ROLES},
        {"key": "b_denser_than_shared", "side": "greater", "group": f"{b}-only",
         "control": "control_b",
         "claim": f"{b}-only latents fire more densely than shared latents",
         "effect_name": f"Cliff's delta ({b}-only vs shared) minus the {b}-{cb} control's "
                        "(exclusive vs shared)", "pairs": ("main", "control_b")},
        {"key": "a_sparser_than_shared", "side": "less", "group": f"{a}-only",
         "control": "control_a",
         "claim": f"{a}-only latents fire less densely than shared latents",
         "effect_name": f"Cliff's delta ({a}-only vs shared) minus the {a}-{ca} control's "
                        "(exclusive vs shared)", "pairs": ("main", "control_a")},
    ]  # fmt: skip


def _sentence(c: dict[str, Any]) -> str:
    head = f"Beyond controls, {c['claim'][0].lower()}{c['claim'][1:]}: {c['verdict']}"
    parts = [f"{c['effect_name']} = {_fmt(c['effect'])}"]
    if c["ci"] is not None:
        parts[0] += f", {CI_LEVEL:.0%} interval [{_fmt(c['ci'][0])}, {_fmt(c['ci'][1])}]"
    if c["key"] == "b_fewer_unique":
        parts += [
            f"{k} = {_fmt(v['value'])} [{_fmt(v['ci'][0])}, {_fmt(v['ci'][1])}]"
            for k, v in c["components"].items()
        ]
    parts.append(f"{c['n_seeds']} seed(s) in the smallest pair")
    if c["reason"]:
        parts.append(c["reason"])
    return f"{head} ({'; '.join(parts)})."


def compare_with_controls(
    main: list[Any],
    control_a: list[Any],
    control_b: list[Any],
    *,
    min_seeds: int = MIN_SEEDS,
    min_n: int = MIN_N,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """The three pairs side by side and the paper's claims beyond the controls (see the module
    docstring). Each argument is a list of FeatureDiff, one per crosscoder seed: main (A vs B),
    control_a (A vs A'), control_b (B vs B'). JSON-serialisable output."""
    a, b = _check_roles(main, control_a, control_b)
    if min_seeds < 1 or min_n < 1 or n_resamples < 10:
        raise CrossdiffError("min_seeds and min_n must be >= 1 and n_resamples >= 10")
    diffs = dict(zip(ROLES, (main, control_a, control_b), strict=True))
    pairs = {role: _pair(d, role) for role, d in diffs.items()}
    other = {r: next(n for n in (pairs[r]["A"], pairs[r]["B"]) if n != x)
             for r, x in (("control_a", a), ("control_b", b))}  # fmt: skip
    claims = []
    for spec in _specs(a, b, other["control_a"], other["control_b"]):
        if spec["key"] == "b_fewer_unique":
            res = _claim_counts(pairs, {"A": a, "B": b}, n_resamples, seed)
        else:
            res = _claim_density(main, diffs[spec["control"]], spec["group"], min_n,
                                 n_resamples, seed)  # fmt: skip
        n_seeds = min(pairs[r]["n_seeds"] for r in spec["pairs"])
        verdict, reason = _verdict(res, spec["side"], n_seeds, min_seeds)
        claim = {
            "key": spec["key"], "claim": spec["claim"], "effect_name": spec["effect_name"],
            "alternative": spec["side"], "effect": res["effect"], "ci": res["ci"],
            "verdict": verdict, "reason": reason, "n_seeds": n_seeds,
            "components": res["components"],
        }  # fmt: skip
        claim["sentence"] = _sentence(claim)
        claims.append(claim)
    return {
        "pairs": pairs,
        "roles": {
            "main": [a, b],
            "control_a": [a, other["control_a"]],
            "control_b": [b, other["control_b"]],
        },  # fmt: skip
        "claims": claims,
        "sentences": [c["sentence"] for c in claims],
        "method": {
            "min_seeds": min_seeds,
            "min_n": min_n,
            "ci_level": CI_LEVEL,
            "n_resamples": n_resamples,
            "seed": seed,
            "verdicts": list(VERDICTS),
            "rule": _RULE,
        },  # fmt: skip
    }


_RULE = (
    "claim 1: excess = main exclusive count - the same-architecture control's per-side "
    "exclusive count (mean over seeds), effect excess_A - excess_B, interval from resampling "
    "seeds within each pair with Poisson counts around each (conservative); claims 2 and 3: "
    "main Cliff's delta (exclusive class vs shared densities) minus the control's (both "
    "exclusive classes pooled vs shared), means over seeds, interval from resampling seeds and "
    "latents within classes; holds beyond controls when the percentile interval excludes 0 on "
    "the claimed side; cannot tell below min_seeds seeds per pair (seed noise unmeasured) or "
    "min_n latents in a compared class"
)
