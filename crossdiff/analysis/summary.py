"""The class-level summary of a feature diff: counts, densities, the paper's claims, domain lift,
reconstruction with the threshold and with BatchTopK, and warnings a reader must see."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from crossdiff.analysis.accumulate import PassStats
from crossdiff.analysis.claims import evaluate_claims
from crossdiff.analysis.classes import DEAD, DESIGNATED, SHARED, class_names
from crossdiff.analysis.density import describe
from crossdiff.analysis.source import TokenSource
from crossdiff.crosscoder.fve import fve_from_sums

# the threshold L0 may differ from k by this factor before the summary warns
L0_WARNING_FACTOR = 2.0


def finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def domain_lift(domain_shares: np.ndarray, domain_tokens: np.ndarray) -> np.ndarray:
    """[d_sae, n_domains]: a latent's activation-mass share in domain d over d's token share
    (1 = no preference; NaN where the latent never fires or d has no tokens)."""
    token_share = domain_tokens / max(float(domain_tokens.sum()), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(token_share > 0, domain_shares / token_share, np.nan)


def _fve(sse: np.ndarray, sst: np.ndarray) -> tuple[float | None, list[float | None]]:
    pooled, per_model = fve_from_sums(sse, sst)
    return finite(pooled), [finite(v) for v in per_model]


def reconstruction(
    stats: PassStats, model_names: tuple[str, ...], d_model: int | tuple[int, ...],
    dead_fraction: float, k: float | int | None,
) -> dict[str, Any]:  # fmt: skip
    """FVE, MSE and L0 with the inference threshold, and with BatchTopK at k when the
    crosscoder has `encode_topk` (None otherwise). `d_model`: one width, or one per model (MSE
    is per element of each model's own width)."""
    n = stats.n_tokens
    widths = d_model if isinstance(d_model, tuple) else (d_model,) * len(model_names)
    fve, per_model = _fve(stats.sse, stats.sst)
    out: dict[str, Any] = {
        "fve": fve,
        "fve_per_model": dict(zip(model_names, per_model, strict=True)),
        "mse_per_model": {
            name: float(v / (n * w))
            for name, v, w in zip(model_names, stats.sse, widths, strict=True)
        },
        "l0": stats.l0_sum / n,
        "k": k,
        "fve_topk": None,
        "fve_topk_per_model": None,
        "l0_topk": None,
        "dead_fraction": dead_fraction,
        "formula": "FVE = 1 - SSE / sum of squared deviations from the mean, over all analysed "
        "tokens, per model; L0 = mean number of latents above the inference threshold per token; "
        "the _topk values encode each batch with BatchTopK at the training k instead",
    }
    if stats.sse_topk is not None:
        fve_topk, per_model_topk = _fve(stats.sse_topk, stats.sst)
        out.update(
            fve_topk=fve_topk,
            fve_topk_per_model=dict(zip(model_names, per_model_topk, strict=True)),
            l0_topk=stats.l0_topk_sum / n,
        )
    return out


def l0_warnings(rec: dict[str, Any]) -> list[str]:
    """A sentence when the threshold L0 is more than L0_WARNING_FACTOR from k (or l0_topk)."""
    k = rec["k"] if rec["k"] is not None else rec["l0_topk"]
    l0 = rec["l0"]
    if not k or l0 is None:
        return []
    ratio = l0 / k
    if 1 / L0_WARNING_FACTOR <= ratio <= L0_WARNING_FACTOR:
        return []
    fves = f"FVE {rec['fve']:.3g} with the threshold"
    if rec["fve_topk"] is not None:
        fves += f", {rec['fve_topk']:.3g} with BatchTopK (L0 {rec['l0_topk']:.3g})"
    return [
        f"The inference threshold gives L0 = {l0:.3g} latents per token, {ratio:.2g}x the "
        f"training k = {k:g} ({fves}). Classes, densities and claims here use the threshold, so "
        f"they describe a {'denser' if ratio > 1 else 'sparser'} code than the one the "
        "crosscoder was trained with; "
        "train longer (the threshold is a running average that settles late) or read them "
        "with the top-k numbers beside them."
    ]


def _designated_rule(shared_decoder: str) -> str:
    if shared_decoder == "tied":
        return "the first n_shared latents (tied decoders): designated-shared; "
    return "the first n_shared latents (free decoders) are classed by r like any other; "


def _designated_breakdown(
    labels: np.ndarray, classes: tuple[str, ...], shared_decoder: str
) -> dict[str, Any]:
    """How the designated shared latents ended up: in free mode a designated latent is only a
    cheaper one and is classed by its relative norm, so it can be model-specific."""
    out: dict[str, Any] = {"n": int(len(labels)), "shared_decoder": shared_decoder}
    for cls in classes:
        if cls != DESIGNATED or shared_decoder == "tied":
            out[cls] = int((labels == cls).sum())
    return out


def _domains(
    stats: PassStats, names: tuple[str, ...], shares: np.ndarray | None, labels, classes, counts
) -> dict[str, Any]:
    domains: dict[str, Any] = {"recorded": shares is not None}
    if shares is None or stats.domain_tokens is None:
        return domains
    lift = domain_lift(shares, stats.domain_tokens)

    def per_class(values: np.ndarray) -> dict[str, Any]:
        return {
            cls: {d: finite(np.nanmean(values[labels == cls, i])) for i, d in enumerate(names)}
            if counts[cls]
            else None
            for cls in classes
            if cls != DEAD
        }

    domains.update(
        names=list(names),
        token_share={
            d: float(stats.domain_tokens[i] / max(stats.domain_tokens.sum(), 1))
            for i, d in enumerate(names)
        },
        mean_share_per_class=per_class(shares),
        mean_lift_per_class=per_class(lift),
        lift="a latent's share of activation mass in a domain over the domain's share of "
        "tokens (1 = no preference); per class, the mean over its latents",
    )
    return domains


def summarize(
    table: pd.DataFrame,
    stats: PassStats,
    source: TokenSource,
    *,
    labels: np.ndarray,
    name_a: str,
    name_b: str,
    split: tuple[str, float, float],
    n_shared: int,
    shared_decoder: str,
    same_basis: bool,
    cosine_reason: str,
    domain_shares: np.ndarray | None,
    scaling_summary: dict[str, Any],
    k: float | int | None = None,
    widths: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    classes = class_names(name_a, name_b)
    class_a, class_b = f"{name_a}-only", f"{name_b}-only"
    density = table["density"].to_numpy()
    counts = {cls: int((labels == cls).sum()) for cls in classes}
    artifact = None
    if scaling_summary.get("computed") and "scaling_artifact" in table:
        artifact = table["scaling_artifact"].to_numpy(dtype=bool)
    claims, claims_method = evaluate_claims(density, labels, name_a, name_b, artifact)
    d_model = int(source.read_acts(0, 1).shape[-1])
    d_sae = len(table)
    rec = reconstruction(
        stats, tuple(source.model_names), widths or d_model, counts[DEAD] / d_sae, k
    )
    warnings = l0_warnings(rec)
    shared_cos = table.loc[np.isin(labels, [SHARED, DESIGNATED]), "decoder_cosine"].to_numpy()
    split_name, lo, hi = split
    return {
        "model_names": list(source.model_names),
        "direction": {
            "A": name_a,
            "B": name_b,
            "relative_norm": f"r = |d_{name_b}| / (|d_{name_a}| + |d_{name_b}|)",
        },
        "split": {
            "name": split_name,
            "lo": lo,
            "hi": hi,
            "rule": f"r < {lo:g}: {class_a}; {lo:g} <= r <= {hi:g}: shared; r > {hi:g}: {class_b}; "
            + _designated_rule(shared_decoder)
            + "never fires on the analysed tokens: dead",
        },
        "n_tokens": stats.n_tokens,
        "d_sae": d_sae,
        "n_shared": n_shared,
        "designated": _designated_breakdown(labels[:n_shared], classes, shared_decoder),
        "classes": list(classes),
        "class_counts": counts,
        "density": {cls: describe(density[labels == cls]) for cls in classes if cls != DEAD},
        "mean_activation": {
            cls: describe(table.loc[labels == cls, "mean_activation"].to_numpy())
            for cls in classes
            if cls != DEAD
        },
        "claims": claims,
        "claims_method": claims_method,
        "alpha": claims_method["alpha"],
        "reconstruction": rec,
        "warnings": warnings,
        "experts": {"recorded": False},  # filled by experts.expert_summary
        "domains": _domains(
            stats, tuple(source.domain_names), domain_shares, labels, classes, counts
        ),
        "latent_scaling": scaling_summary,
        "decoder_cosine": {
            "meaningful": bool(same_basis),
            "reason": cosine_reason,
            "shared_median": finite(np.nanmedian(shared_cos))
            if np.isfinite(shared_cos).any()
            else None,
        },
        "sentences": [c["sentence"] for c in claims] + warnings,
    }  # fmt: skip
