"""The seed paper's three claims, each with n per class, an effect size with a bootstrap CI, a
raw and a Holm-adjusted p-value and a verdict; also with latent-scaling artifacts excluded.

1. b_fewer_unique: B (the MoE) learns fewer unique features than A (dense): fewer B-only than
   A-only latents. Exact one-sided binomial test of the B-only share of exclusive latents
   against 1/2; effect: that share.
2. b_denser_than_shared: B-only latents fire more densely than shared ones. One-sided
   Mann-Whitney U; effect: Cliff's delta of B-only against shared densities.
3. a_sparser_than_shared: A-only latents fire less densely than shared ones (as 2, 'less').

'Shared' is the shared class plus the designated-shared one. A claim with fewer than `min_n`
latents in a compared class (claim 1: exclusive latents in all) is "too few latents to test".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crossdiff.analysis.classes import DESIGNATED, SHARED
from crossdiff.analysis.stats import (
    CI_LEVEL,
    N_RESAMPLES,
    SEED,
    binomial_p,
    bootstrap_cliffs_delta,
    bootstrap_proportion,
    cliffs_delta,
    holm,
    mann_whitney_p,
)

ALPHA = 0.05
MIN_N = 10
HOLDS, DOES_NOT_HOLD, TOO_FEW = "holds", "does not hold", "too few latents to test"
VERDICTS = (HOLDS, DOES_NOT_HOLD, TOO_FEW)
NOT_INDEPENDENT = (
    "latents of one dictionary are not independent samples, so the p-value is descriptive; "
    "other crosscoder seeds and model seeds (crossdiff run --model-seeds) are the real test"
)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _one(
    spec: dict[str, Any],
    group: np.ndarray,
    reference: np.ndarray,
    *,
    min_n: int,
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Effect, CI, raw p and 'enough' for one claim on one set of latents (no Holm yet)."""
    n_g, n_r = len(group), len(reference)
    out: dict[str, Any] = {
        "n": {spec["group_name"]: n_g, spec["reference_name"]: n_r},
        "effect": None,
        "ci": None,
        "p_value": None,
    }
    if spec["kind"] == "count":
        total = n_g + n_r
        out["enough"] = total >= min_n
        if total:
            out["effect"] = n_g / total
        if out["enough"]:
            out["ci"] = list(bootstrap_proportion(n_g, total, n_resamples=n_resamples, seed=seed))
            out["p_value"] = binomial_p(n_g, total, spec["alternative"])
        return out
    out["enough"] = min(n_g, n_r) >= min_n
    if n_g and n_r:
        out["effect"] = cliffs_delta(group, reference)
    if out["enough"]:
        ci = bootstrap_cliffs_delta(group, reference, n_resamples=n_resamples, seed=seed)
        out["ci"] = list(ci)
        out["p_value"] = mann_whitney_p(group, reference, spec["alternative"])
    return out


def _verdict(res: dict[str, Any], spec: dict[str, Any], alpha: float) -> str:
    if not res["enough"]:
        return TOO_FEW
    lo, hi = res["ci"]
    beyond = hi < spec["null"] if spec["alternative"] == "less" else lo > spec["null"]
    return HOLDS if res["p_holm"] < alpha and beyond else DOES_NOT_HOLD


def _sentence(res: dict[str, Any], spec: dict[str, Any], min_n: int, prefix: str) -> str:
    names = list(res["n"])
    n_text = f"n = {res['n'][names[0]]} {names[0]} vs {res['n'][names[1]]} {names[1]}"
    effect = f"{spec['effect_name']} = {_fmt(res['effect'])}"
    if res["verdict"] == TOO_FEW:
        need = (
            f"at least {min_n} exclusive latents are needed"
            if spec["kind"] == "count"
            else f"at least {min_n} per class are needed"
        )
        head = f"{prefix}{spec['claim']}: {TOO_FEW} ({n_text}; {need})"
        if res["effect"] is None:
            return head + "."
        return f"{head}; {effect} on these few latents is not a finding."
    lo, hi = res["ci"]
    return (
        f"{prefix}{spec['claim']}: {res['verdict']} ({n_text}; {effect}, "
        f"{CI_LEVEL:.0%} CI [{_fmt(lo)}, {_fmt(hi)}]; {spec['test_short']} "
        f"p = {_fmt(res['p_value'], 2)}, Holm-adjusted p = {_fmt(res['p_holm'], 2)}); "
        f"{NOT_INDEPENDENT}."
    )


def _specs(name_a: str, name_b: str, ref_name: str) -> list[dict[str, Any]]:
    class_a, class_b = f"{name_a}-only", f"{name_b}-only"
    return [
        {
            "key": "b_fewer_unique",
            "claim": f"The {name_b} model learns fewer unique features than the {name_a} model "
            f"(fewer {class_b} than {class_a} latents)",
            "test": f"exact one-sided binomial test (scipy.stats.binomtest) of the {class_b} "
            "count among exclusive latents against 1/2",
            "test_short": "binomial",
            "effect_name": f"{class_b} share of exclusive latents",
            "kind": "count",
            "group": class_b,
            "group_name": class_b,
            "reference_name": class_a,
            "alternative": "less",
            "null": 0.5,
        },
        {
            "key": "b_denser_than_shared",
            "claim": f"{class_b} latents fire more densely than {ref_name} latents",
            "test": "one-sided Mann-Whitney U (scipy.stats.mannwhitneyu) of densities",
            "test_short": "one-sided Mann-Whitney",
            "effect_name": "Cliff's delta",
            "kind": "density",
            "group": class_b,
            "group_name": class_b,
            "reference_name": ref_name,
            "alternative": "greater",
            "null": 0.0,
        },
        {
            "key": "a_sparser_than_shared",
            "claim": f"{class_a} latents fire less densely than {ref_name} latents",
            "test": "one-sided Mann-Whitney U (scipy.stats.mannwhitneyu) of densities",
            "test_short": "one-sided Mann-Whitney",
            "effect_name": "Cliff's delta",
            "kind": "density",
            "group": class_a,
            "group_name": class_a,
            "reference_name": ref_name,
            "alternative": "less",
            "null": 0.0,
        },
    ]


def _family(
    specs: list[dict[str, Any]],
    samples: list[tuple[np.ndarray, np.ndarray]],
    *,
    alpha: float,
    min_n: int,
    n_resamples: int,
    seed: int,
    prefix: str = "",
) -> list[dict[str, Any]]:
    """Evaluate the claims as one family: Holm across the ones with enough latents."""
    results = [
        _one(spec, g, r, min_n=min_n, n_resamples=n_resamples, seed=seed)
        for spec, (g, r) in zip(specs, samples, strict=True)
    ]
    for res, p_holm in zip(results, holm([r["p_value"] for r in results]), strict=True):
        res["p_holm"] = p_holm
    for spec, res in zip(specs, results, strict=True):
        res["verdict"] = _verdict(res, spec, alpha)
        res["sentence"] = _sentence(res, spec, min_n, prefix)
        del res["enough"]
    return results


def _samples(
    specs: list[dict[str, Any]], density: np.ndarray, labels: np.ndarray, keep: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    ref = keep & np.isin(labels, [SHARED, DESIGNATED])
    out = []
    for spec in specs:
        group = keep & (labels == spec["group"])
        if spec["kind"] == "count":
            other = keep & (labels == spec["reference_name"])
            out.append((density[group], density[other]))
        else:
            out.append((density[group], density[ref]))
    return out


def evaluate_claims(
    density: np.ndarray,
    labels: np.ndarray,
    name_a: str,
    name_b: str,
    artifact: np.ndarray | None,
    *,
    alpha: float = ALPHA,
    min_n: int = MIN_N,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(claims, method): one dict per claim, in a stable order with stable keys, and the rules.

    density, labels: per latent; artifact: per-latent latent-scaling artifact flags, or None when
    latent scaling was not computed (then `excluding_artifacts` is None).
    """
    labels = np.asarray(labels).astype(str)
    ref_name = SHARED if not (labels == DESIGNATED).any() else f"{SHARED} + {DESIGNATED}"
    specs = _specs(name_a, name_b, ref_name)
    opts = dict(alpha=alpha, min_n=min_n, n_resamples=n_resamples, seed=seed)
    everything = np.ones(len(labels), dtype=bool)
    main = _family(specs, _samples(specs, density, labels, everything), **opts)
    excluded: list[dict[str, Any] | None] = [None] * len(specs)
    if artifact is not None:
        flagged = np.asarray(artifact, dtype=bool)
        n_out = int(flagged.sum())
        prefix = f"Without the {n_out} latent-scaling artifact(s): "
        keep = ~flagged
        excluded = _family(specs, _samples(specs, density, labels, keep), prefix=prefix, **opts)
        for res in excluded:
            res["n_excluded"] = {
                cls: int((flagged & (labels == cls)).sum())
                for cls in (f"{name_a}-only", f"{name_b}-only")
            }
    claims = []
    for spec, res, ex in zip(specs, main, excluded, strict=True):
        claims.append(
            {
                "key": spec["key"],
                "claim": spec["claim"],
                "test": spec["test"],
                "alternative": spec["alternative"],
                "effect_name": spec["effect_name"],
                "null_effect": spec["null"],
                **res,
                "excluding_artifacts": ex,
            }
        )
    method = {
        "alpha": alpha,
        "min_n": min_n,
        "ci_level": CI_LEVEL,
        "n_resamples": n_resamples,
        "seed": seed,
        "verdicts": list(VERDICTS),
        "rule": (
            f"holds when the Holm-adjusted p is below {alpha:g} and the {CI_LEVEL:.0%} "
            "percentile-bootstrap CI of the effect (latents resampled, fixed seed) excludes the "
            "null on the claimed side; too few latents to test below min_n latents per compared "
            "class (claim 1: exclusive latents in all); Holm runs over the tested claims, "
            "separately for the artifact-excluded ones"
        ),
        "caveat": NOT_INDEPENDENT[0].upper() + NOT_INDEPENDENT[1:] + ".",
        "artifacts_excluded": artifact is not None,
    }
    return claims, method
