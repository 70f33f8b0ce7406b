"""The paper's three claims about two architectures, from crosscoders over N model seeds of each.

Input: one `JointFit` per crosscoder seed of a crosscoder over 2N models (N of architecture A,
N of B, the same tokens). Latents are attributed per latent (crossdiff.analysis.attribution); the
claims are then tested at each split (0.3/0.7, 0.2/0.8, 0.1/0.9) side by side:

1. b_fewer_unique: T = (#A-specific) - (#B-specific) > 0. Test: the N-vs-N permutation null. The
   architecture labels enter only the classification (the crosscoder never sees them), so under
   "no architecture difference" the true split of the 2N models is one of the C(2N, N) ordered
   splits, each as likely: p = the share of splits whose T is at least the true split's. With N
   model seeds the smallest p is 1 / C(2N, N) (1/6 at N = 2, 1/20 at N = 3): below N = 3 the test
   cannot reach alpha = 0.05 and the verdict is "cannot tell".
2. b_denser_than_shared: Cliff's delta of firing densities, B-specific vs shared, > 0.
3. a_sparser_than_shared: Cliff's delta, A-specific vs shared, < 0.

Intervals (normal, 95 %) carry three sources of noise: model seeds (a delete-one jackknife over
each architecture's models: the statistic recomputed without each model in turn), crosscoder
seeds (their variance over fits, divided by the number of fits) and, for the deltas, latents
(the bootstrap variance of each fit's delta). `n` at each level is reported with each claim.

Verdicts: "holds" when the test rejects on the claimed side (claim 1: p <= alpha and the interval
excludes 0; claims 2-3: the interval excludes 0 on the claimed side); "does not hold" when the
design could have shown it and did not (claim 1: p > alpha with N >= 3; claims 2-3: the interval
lies on the opposite side of 0); "cannot tell" otherwise, with the reason (too few model seeds to
reach alpha, too few latents in a compared class, no latent specific at this split, or an
interval that covers 0). Before any claim the report says when no latent is exclusive at
0.1/0.9: the claims at looser splits are then statements about the tails of one peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crossdiff.analysis import attribution as att
from crossdiff.analysis.stats import CI_LEVEL, cliffs_delta, cliffs_delta_resamples
from crossdiff.plumbing.common import CrossdiffError

HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold", "cannot tell"
ALPHA = 0.05
MIN_N = 10  # latents per compared class for a density claim
N_RESAMPLES = 400


@dataclass
class JointFit:
    """One crosscoder over the 2N models: decoder norms [d_sae, n_models] (normalized units),
    which latents fired on the evaluated tokens and how often (fraction of tokens)."""

    norms: np.ndarray
    live: np.ndarray
    density: np.ndarray
    n_designated: int = 0
    seed: int | None = None


def _z() -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + CI_LEVEL / 2))


def _groups(architectures: Sequence[str]) -> dict[str, list[int]]:
    names = list(dict.fromkeys(architectures))
    if len(names) != 2:
        raise CrossdiffError(
            f"architectures {list(architectures)} must name exactly two architectures, one "
            "per model column of the joint crosscoder"
        )
    groups = {n: [i for i, x in enumerate(architectures) if x == n] for n in names}
    sizes = {n: len(c) for n, c in groups.items()}
    if len(set(sizes.values())) > 1 or min(sizes.values()) < 2:
        raise CrossdiffError(
            f"model seeds per architecture {sizes}: the design needs the same number N >= 2 of "
            "models of each architecture (crossdiff run --model-seeds N)"
        )
    return groups


class _Design:
    """The fits and model columns, with a statistic evaluated on all models or all but one."""

    def __init__(self, fits: Sequence[JointFit], groups: dict[str, list[int]], lo: float):
        self.fits, self.groups, self.lo = list(fits), groups, lo
        self.carried = [att.carriers(f.norms, lo) & f.live[:, None] for f in self.fits]
        (self.a, self.cols_a), (self.b, self.cols_b) = groups.items()
        self._labels: dict[tuple[int, int | None], np.ndarray] = {}

    def labels(self, fit: int, drop: int | None = None) -> np.ndarray:
        """The classes of `fit`'s latents on all models, or without model `drop` (cached: every
        statistic's estimate reads the same (fit, drop) labels)."""
        key = (fit, drop)
        if key not in self._labels:
            self._labels[key] = self._classify(fit, drop)
        return self._labels[key]

    def _classify(self, fit: int, drop: int | None) -> np.ndarray:
        keep = [m for m in range(self.carried[fit].shape[1]) if m != drop]
        groups = {g: [keep.index(m) for m in c if m != drop] for g, c in self.groups.items()}
        f = self.fits[fit]
        norms = f.norms[:, keep]
        carried = att.carriers(norms, self.lo) & f.live[:, None]
        return att.classify_latents(carried, groups, f.live, f.n_designated)

    def estimate(
        self, stat: Callable[[np.ndarray, JointFit], float | None], *, count: bool = False
    ) -> dict[str, Any]:
        """stat(labels, fit) on all models, per fit, with the jackknife over model seeds and the
        crosscoder-seed variance; value None where stat is None for some fit. count: the
        interval is clipped at 0 (a normal interval around a small count reaches below it)."""
        full = [stat(self.labels(i), f) for i, f in enumerate(self.fits)]
        if any(v is None for v in full):
            return {"value": None, "per_fit": full, "ci": None, "se": None}
        value = float(np.mean(full))
        var_models = 0.0
        for cols in (self.cols_a, self.cols_b):
            loo = []
            for m in cols:
                vals = [stat(self.labels(i, drop=m), f) for i, f in enumerate(self.fits)]
                loo.append(np.nan if any(v is None for v in vals) else float(np.mean(vals)))
            loo_arr = np.array(loo)
            n = len(cols)
            if np.isfinite(loo_arr).all():
                var_models += (n - 1) / n * float(((loo_arr - loo_arr.mean()) ** 2).sum())
        var_cc = float(np.var(full, ddof=1)) / len(full) if len(full) > 1 else 0.0
        se = math.sqrt(var_models + var_cc)
        return {
            "value": value,
            "per_fit": [float(v) for v in full],
            "se": se,
            "se_model_seeds": math.sqrt(var_models),
            "se_crosscoder_seeds": math.sqrt(var_cc) if len(full) > 1 else None,
            "ci": [max(0.0, value - _z() * se) if count else value - _z() * se, value + _z() * se],
        }


def _count_stat(cls: str) -> Callable[[np.ndarray, JointFit], float]:
    return lambda labels, _fit: float((labels == cls).sum())


def _permutation(design: _Design) -> dict[str, Any]:
    """T of every ordered N-vs-N split (mean over fits) and where the true split falls."""
    n_models = design.carried[0].shape[1]
    splits = att.balanced_splits(n_models)
    t = np.zeros(len(splits))
    for carried in design.carried:
        for k, (g1, g2) in enumerate(splits):
            x, y = att.group_specific_counts(carried, g1, g2)
            t[k] += (x - y) / len(design.carried)
    true = splits.index((tuple(design.cols_a), tuple(design.cols_b)))
    observed = float(t[true])
    return {
        "n_splits": len(splits),
        "observed": observed,
        "null": [float(v) for v in t],
        "rank": int((t > observed + 1e-9).sum()) + 1,  # 1 = the largest T of all splits
        "p": float((t >= observed - 1e-9).mean()),
        "min_p": 1.0 / len(splits),
        "splits": [[list(g1), list(g2)] for g1, g2 in splits],
    }


def _delta_stat(group: str, n_resamples: int, seed: int, min_n: int):
    """(stat for Design.estimate, latent-bootstrap variance per fit)."""

    def pick(labels: np.ndarray, fit: JointFit) -> tuple[np.ndarray, np.ndarray]:
        ref = np.isin(labels, (att.SHARED, att.DESIGNATED))
        return fit.density[labels == group], fit.density[ref]

    def stat(labels: np.ndarray, fit: JointFit) -> float | None:
        x, y = pick(labels, fit)
        return cliffs_delta(x, y) if len(x) >= min_n and len(y) >= min_n else None

    def latent_var(labels: np.ndarray, fit: JointFit) -> float:
        x, y = pick(labels, fit)
        reps = cliffs_delta_resamples(x, y, n_resamples=n_resamples, seed=seed)
        return float(np.var(reps, ddof=1))

    return stat, latent_var


def _density_claim(design: _Design, group: str, side: str, n: int, seed: int, min_n: int):
    stat, latent_var = _delta_stat(group, n, seed, min_n)
    est = design.estimate(stat)
    sizes = [int((design.labels(i) == group).sum()) for i in range(len(design.fits))]
    if est["value"] is None:
        reason = (
            f"too few {group} latents (per crosscoder seed {sizes}; at least {min_n} are needed "
            "in each compared class)"
        )
        return est, CANNOT_TELL, reason, sizes
    var_latents = np.mean([latent_var(design.labels(i), f) for i, f in enumerate(design.fits)])
    se = math.sqrt(est["se"] ** 2 + var_latents / len(design.fits))
    est.update(se=se, se_latents=math.sqrt(var_latents / len(design.fits)))
    est["ci"] = [est["value"] - _z() * se, est["value"] + _z() * se]
    lo, hi = est["ci"]
    claimed = lo > 0 if side == "greater" else hi < 0
    opposite = hi < 0 if side == "greater" else lo > 0
    if claimed:
        return est, HOLDS, "", sizes
    if opposite:
        return est, DOES_NOT_HOLD, "the interval lies on the other side of 0", sizes
    return est, CANNOT_TELL, "the interval covers 0: the data do not decide", sizes


def _count_claim(design: _Design, alpha: float):
    est = design.estimate(
        lambda labels, _f: float(
            (labels == att.specific(design.a)).sum() - (labels == att.specific(design.b)).sum()
        )
    )
    perm = _permutation(design)
    n_specific = [
        int(np.isin(design.labels(i), (att.specific(design.a), att.specific(design.b))).sum())
        for i in range(len(design.fits))
    ]
    if perm["min_p"] > alpha:
        n = len(design.cols_a)
        reason = (
            f"with {n} model seeds per architecture the permutation test's smallest p is "
            f"1/{perm['n_splits']} = {perm['min_p']:.3g} > {alpha}: train at least 3 model seeds"
        )
        return est, perm, CANNOT_TELL, reason
    if max(n_specific) == 0:  # the design finds planted specific latents (tests): absence counts
        reason = "no latent is architecture-specific at this split (0 vs 0 in every crosscoder)"
        return est, perm, DOES_NOT_HOLD, reason
    if perm["p"] <= alpha and est["ci"][0] > 0:
        return est, perm, HOLDS, ""
    if perm["p"] <= alpha:
        return est, perm, CANNOT_TELL, "beyond the permutation null, but the interval covers 0"
    reason = f"the true split is not beyond the N-vs-N permutation null (p = {perm['p']:.3g})"
    return est, perm, DOES_NOT_HOLD, reason


def compare_architectures(
    fits: Sequence[JointFit],
    architectures: Sequence[str],
    *,
    model_names: Sequence[str] | None = None,
    thresholds: Sequence[float] = att.THRESHOLDS,
    alpha: float = ALPHA,
    min_n: int = MIN_N,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-latent attribution and the three claims at each split (module docstring).

    fits: one JointFit per crosscoder seed (same models, same column order); architectures: the
    architecture of each model column, A first (e.g. ['dense'] * N + ['moe'] * N). JSON-ready.
    """
    if not fits:
        raise CrossdiffError("compare_architectures needs at least one JointFit")
    groups = _groups(architectures)
    n_models = len(architectures)
    for f in fits:
        if f.norms.ndim != 2 or f.norms.shape[1] != n_models:
            raise CrossdiffError(
                f"a fit's norms have shape {f.norms.shape}; expected [d_sae, {n_models}] (one "
                "column per entry of architectures)"
            )
    names = list(model_names or [f"model_{m}" for m in range(n_models)])
    (a, cols_a), (b, cols_b) = groups.items()
    per_split: dict[str, Any] = {}
    for lo in thresholds:
        design = _Design(fits, groups, lo)
        classes = att.class_list(a, b)
        class_counts = {c: design.estimate(_count_stat(c), count=True) for c in classes}
        est, perm, verdict, reason = _count_claim(design, alpha)
        claims = [_claim("b_fewer_unique", f"The {b} model learns fewer unique features than "
                         f"the {a} model", f"#{a}-specific - #{b}-specific", "greater", est,
                         verdict, reason, permutation=perm)]  # fmt: skip
        for key, group, side, text in (
            ("b_denser_than_shared", att.specific(b), "greater",
             f"{b}-specific latents fire more densely than shared latents"),
            ("a_sparser_than_shared", att.specific(a), "less",
             f"{a}-specific latents fire less densely than shared latents"),
        ):  # fmt: skip
            d_est, d_verdict, d_reason, sizes = _density_claim(
                design, group, side, n_resamples, seed, min_n
            )
            claims.append(_claim(key, text, f"Cliff's delta (densities, {group} vs shared)",
                                 side, d_est, d_verdict, d_reason, n_latents=sizes))  # fmt: skip
        n_exclusive = [
            int(
                np.isin(design.labels(i), (att.SHARED, att.DESIGNATED, att.DEAD), invert=True).sum()
            )
            for i in range(len(fits))
        ]
        shared_paper = design.estimate(
            lambda labels, _f: float(np.isin(labels, (att.SHARED, att.DESIGNATED)).sum()),
            count=True,
        )
        per_split[att.split_label(lo)] = {
            "lo": lo,
            "class_counts": class_counts,
            "shared_with_designated": shared_paper,
            "n_not_shared": n_exclusive,
            "claims": claims,
        }
    strict = per_split[att.split_label(min(thresholds))]
    nothing = max(strict["n_not_shared"]) == 0
    headline = []
    if nothing:
        headline.append(
            f"No latent is exclusive at {att.split_label(min(thresholds))}: every live latent is "
            "carried by every model, so the classes at looser splits are the tails of one "
            "distribution of relative norms, not separate populations."
        )
    return {
        "architectures": {a: [names[m] for m in cols_a], b: [names[m] for m in cols_b]},
        "model_names": names,
        "n_model_seeds": len(cols_a),
        "n_crosscoder_seeds": len(fits),
        "d_sae": int(fits[0].norms.shape[0]),
        "nothing_exclusive": nothing,
        "headline": headline,
        "splits": per_split,
        "relative_norms": _pair_distributions(fits[0], names, cols_a, cols_b),
        "method": {
            "alpha": alpha,
            "min_n": min_n,
            "ci_level": CI_LEVEL,
            "n_resamples": n_resamples,
            "rule": __doc__.split("\n\n", 1)[1].strip(),
            "attribution": att.__doc__.split("\n\n", 1)[1].strip(),
        },  # fmt: skip
    }


def _claim(key, text, effect_name, side, est, verdict, reason, **extra) -> dict[str, Any]:
    return {"key": key, "claim": text, "effect_name": effect_name, "alternative": side,
            "effect": est["value"], "ci": est["ci"], "estimate": est, "verdict": verdict,
            "reason": reason, **extra}  # fmt: skip


def _pair_distributions(fit: JointFit, names, cols_a, cols_b) -> dict[str, Any]:
    """r per pair of models of the first fit: the main pair (first A vs first B) and the first
    same-architecture pairs (A vs A', B vs B')."""
    pairs = {"main": (cols_a[0], cols_b[0]), "same_a": (cols_a[0], cols_a[1]),
             "same_b": (cols_b[0], cols_b[1])}  # fmt: skip
    out = {}
    for role, (i, j) in pairs.items():
        out[role] = {"models": [names[i], names[j]],
                     **att.pair_relative_norms(fit.norms, fit.live, i, j)}  # fmt: skip
    return out


def joint_fit(
    cc: Any,
    source: Any,
    *,
    batch_size: int = 4096,
    max_tokens: int | None = None,
    seed: int | None = None,
) -> JointFit:
    """A JointFit of crosscoder `cc` on the evaluated tokens of `source` (an ActivationSource,
    e.g. a JointSource's held-out part, or a Tensor [n, n_models, d_model] of raw activations;
    its first `max_tokens`): decoder norms in training units, and each latent's firing density
    under cc.encode."""
    import torch

    read = (
        (lambda lo, hi: source[lo:hi])
        if isinstance(source, torch.Tensor)
        else (lambda lo, hi: source.read_acts(lo, hi))
    )
    n = int(source.shape[0] if isinstance(source, torch.Tensor) else source.n_tokens)
    n = n if max_tokens is None else min(n, max_tokens)
    if n == 0:
        raise CrossdiffError("joint_fit needs at least one token to evaluate on")
    w = cc.W_dec
    fires = torch.zeros(w.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            x = read(lo, min(n, lo + batch_size)).to(device=w.device, dtype=w.dtype)
            fires += (cc.encode(x) > 0).sum(0).double().cpu()
    cfg = cc.cfg
    designated = int(cfg.n_shared) if getattr(cfg, "shared_decoder", "free") == "tied" else 0
    return JointFit(
        norms=cc.decoder_norms().detach().float().cpu().numpy(),
        live=(fires > 0).numpy(),
        density=(fires / n).numpy(),
        n_designated=designated,
        seed=seed,
    )
