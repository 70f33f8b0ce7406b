"""diff_features: the per-latent table and the class summary of a trained crosscoder."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch

from crossdiff.activations.store import evaluation_part
from crossdiff.analysis.accumulate import PassStats, run_pass
from crossdiff.analysis.classes import (
    DEAD,
    class_names,
    classify,
    decoder_cosine,
    relative_norm,
    resolve_split,
)
from crossdiff.analysis.contexts import build_contexts, context_centers
from crossdiff.analysis.experts import (
    DEFAULT_MIN_FIRINGS,
    add_expert_columns,
    attribute,
    expert_detail,
    expert_summary,
)
from crossdiff.analysis.feature_diff import FeatureDiff
from crossdiff.analysis.latent_scaling import (
    MIN_SHARE,
    free_direction_scaling,
    own_direction_scaling,
)
from crossdiff.analysis.source import TokenSource
from crossdiff.analysis.summary import domain_lift, summarize
from crossdiff.analysis.summary import finite as _finite
from crossdiff.common import CrossdiffError
from crossdiff.crosscoder.fve import pooled_normalized_fve
from crossdiff.crosscoder.metrics import check_zero_padding, normalized_unit_factors


def _crosscoder_config(cc: Any) -> dict[str, Any]:
    cfg = getattr(cc, "cfg", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        try:
            raw = cfg.to_dict()
        except Exception:
            raw = {}
    elif dataclasses.is_dataclass(cfg):
        raw = dataclasses.asdict(cfg)
    else:
        raw = dict(vars(cfg))
    return {k: v for k, v in raw.items() if isinstance(v, str | int | float | bool | type(None))}


def _resolve_direction(
    direction: tuple[str, str] | None, model_names: tuple[str, ...]
) -> tuple[int, int]:
    if direction is None:
        if len(model_names) >= 2 and {"dense", "moe"} <= set(model_names):
            return model_names.index("dense"), model_names.index("moe")
        return 0, 1
    a, b = direction
    missing = [n for n in (a, b) if n not in model_names]
    if missing or a == b:
        raise CrossdiffError(
            f"direction {direction!r} must name two different models of {model_names}; "
            f"e.g. direction=({model_names[0]!r}, {model_names[1]!r})"
        )
    return model_names.index(a), model_names.index(b)


def _fmt_reason(same_basis: bool, inferred: str, shared_decoder: str) -> str:
    if same_basis:
        return f"the two models' vectors live in one basis ({inferred}), so cosines are meaningful"
    tied = (
        " (this crosscoder's tied designated decoders do not change that: they force one vector "
        "on two unrelated spaces)"
        if shared_decoder == "tied"
        else ""
    )
    return (
        f"the models are treated as trained independently ({inferred}), so their activation "
        f"bases are unrelated{tied} and a cosine between their decoder vectors means nothing; it "
        "is reported only for completeness"
    )


def diff_features(
    cc: Any,
    acts_or_store: Any,
    *,
    metadata: dict[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
    split: str | tuple[float, float] = "paper",
    direction: tuple[str, str] | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1024,
    n_top_contexts: int = 20,
    context_window: int = 5,
    latent_scaling: bool = True,
    panels_per_class: int = 8,
    same_basis: bool | None = None,
    model_names: tuple[str, ...] | list[str] | None = None,
    domain_names: tuple[str, ...] | list[str] | None = None,
    show_progress: bool = True,
    min_expert_firings: int = DEFAULT_MIN_FIRINGS,
    expert_layout: list[dict[str, Any]] | None = None,
    part: str | None = None,
) -> FeatureDiff:
    """Classify every latent of `cc` (designated-shared, shared, A-only, B-only, dead) and measure

    its density, activation, domain shares, routed experts and (for model-specific latents) latent
    scaling, in one streaming pass over the tokens (plus small reads for the top contexts).

    acts_or_store: an ActivationStore, or raw activations Tensor[n_tokens, n_models, d_model] with
    an optional `metadata` dict of per-token tensors (token_ids, doc_ids, positions, domains,
    experts).
    split: 'paper' (0.3/0.7), 'anchors' (0.1/0.9) or (lo, hi) on r = |d_B| / (|d_A| + |d_B|).
    direction: (A, B) model names; default ('dense', 'moe') when those exist, else models 0, 1.
    max_tokens: analyse at most this many tokens, taken as evenly spaced contiguous chunks.
    same_basis: whether the models' activations share one basis (two checkpoints of one model);
    default False in every mode (dense and MoE are trained independently, so their bases are
    unrelated even when the designated shared decoders are tied). Decides whether cosines are
    meaningful and which form latent scaling takes.
    min_expert_firings: below this many firings (per MoE layer) no expert attribution is made.
    expert_layout: which columns of metadata['experts'] belong to which MoE layer, as a store
    manifest's experts.layout: [{'layer': 0, 'n_experts': 8, 'columns': [0, 2]}, ...]; default:
    the store's map, else the whole row is one layer.
    part: which tokens of a store: its held-out part by default (the training part, with a
    warning, when it has none), or 'train' / 'heldout' / 'all'; summary["evaluated_on"] says.
    """
    split_name, lo, hi = resolve_split(split)
    acts_or_store, evaluated_on = evaluation_part(acts_or_store, part)
    source = TokenSource(acts_or_store, metadata, model_names, domain_names)
    w_dec = cc.W_dec.detach()
    if w_dec.ndim != 3:
        raise CrossdiffError(
            f"cc.W_dec must be [d_sae, n_models, d_model], got shape {tuple(w_dec.shape)}; is this "
            "a crossdiff CrossCoder?"
        )
    d_sae, n_models_cc, d_model = w_dec.shape
    if n_models_cc != source.n_models:
        raise CrossdiffError(
            f"the crosscoder reads {n_models_cc} models but the activations have "
            f"{source.n_models}; use the store the crosscoder was trained on"
        )
    if n_models_cc < 2:
        raise CrossdiffError("a feature diff needs a crosscoder over at least 2 models")
    probe = source.read_acts(0, 1)
    if probe.shape[-1] != d_model:
        raise CrossdiffError(
            f"the crosscoder has d_model {d_model} but the activations have width "
            f"{probe.shape[-1]}; use the store the crosscoder was trained on"
        )
    if n_top_contexts < 1 or context_window < 0 or batch_size < 1:
        raise CrossdiffError(
            "n_top_contexts and batch_size must be >= 1 and context_window >= 0; got "
            f"{n_top_contexts}, {batch_size}, {context_window}"
        )
    if min_expert_firings < 1:
        raise CrossdiffError(
            f"min_expert_firings must be >= 1, got {min_expert_firings}; 20 is the default"
        )
    a, b = _resolve_direction(
        tuple(direction) if direction is not None else None, source.model_names
    )
    name_a, name_b = source.model_names[a], source.model_names[b]
    cfg = getattr(cc, "cfg", None)
    n_shared = int(getattr(cfg, "n_shared", 0) or 0)
    shared_decoder = str(getattr(cfg, "shared_decoder", "free") or "free")
    # tied designated latents keep their own class; free ones are classed by relative norm
    n_tied = n_shared if shared_decoder == "tied" else 0
    if same_basis is None:
        same_basis = False
        basis_reason = (
            "same_basis=False, the default; pass same_basis=True only for two checkpoints of "
            "one model"
        )
    else:
        same_basis = bool(same_basis)
        basis_reason = f"same_basis={same_basis} set by the caller"
    widths = tuple(getattr(cfg, "widths", None) or (d_model,) * n_models_cc)
    if same_basis and len(set(widths)) > 1:
        raise CrossdiffError(
            f"same_basis=True but the models have different widths {list(widths)}: their "
            "activations cannot share one basis; leave same_basis out"
        )
    if len(set(widths)) > 1 and isinstance(acts_or_store, torch.Tensor):
        check_zero_padding(acts_or_store, cfg)

    norms_t = (
        cc.decoder_norms().detach() if hasattr(cc, "decoder_norms") else w_dec.norm(dim=-1)
    ).float()
    norms = norms_t.cpu().numpy().astype(np.float64)
    r = relative_norm(norms_t, a, b).cpu().numpy().astype(np.float64)
    cosine = decoder_cosine(w_dec, a, b).cpu().numpy().astype(np.float64)
    # model-specific by weights (dead ones are dropped after the pass)
    spec_mask = np.zeros(d_sae, dtype=bool)
    spec_mask[n_tied:] = (r[n_tied:] < lo) | (r[n_tied:] > hi)
    scaling_ids = np.nonzero(spec_mask)[0] if latent_scaling else np.zeros(0, dtype=np.int64)

    ranges = source.ranges(max_tokens)
    stats = run_pass(
        cc,
        source,
        ranges,
        batch_size=batch_size,
        n_top=n_top_contexts,
        scaling_latents=scaling_ids,
        show_progress=show_progress,
        expert_layout=expert_layout,
    )
    fires = stats.fire_count > 0
    labels = classify(r, fires, n_tied, lo, hi, name_a, name_b)
    n = stats.n_tokens
    density = stats.fire_count / n
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_act = np.where(fires, stats.act_sum / np.maximum(stats.fire_count, 1), np.nan)

    table = pd.DataFrame(
        {
            "latent": np.arange(d_sae),
            "class": labels.astype(str),
            "designated_shared": np.arange(d_sae) < n_shared,
            f"norm_{name_a}": norms[:, a],
            f"norm_{name_b}": norms[:, b],
            "relative_norm": r,
            "decoder_cosine": cosine,
            "density": density,
            "fire_count": stats.fire_count.astype(np.int64),
            "mean_activation": mean_act,
        }
    )
    for m, name in enumerate(source.model_names):
        if m not in (a, b):
            table[f"norm_{name}"] = norms[:, m]

    domain_shares = None
    if stats.domain_mass is not None:
        mass_total = stats.domain_mass.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            domain_shares = np.where(mass_total > 0, stats.domain_mass / mass_total, np.nan)
        for i, dname in enumerate(source.domain_names):
            table[f"share_{dname}"] = domain_shares[:, i]
        lift = domain_lift(domain_shares, stats.domain_tokens)
        for i, dname in enumerate(source.domain_names):
            table[f"lift_{dname}"] = lift[:, i]

    attribution = None
    if stats.experts is not None:
        attribution = attribute(stats.experts, min_expert_firings)
        add_expert_columns(table, attribution)

    # decoder_norms() may be in training units; bring latent scaling's norms to the same units
    raw = w_dec.float().norm(dim=-1)
    with torch.no_grad():
        unit = torch.where(raw > 0, norms_t / raw.clamp_min(1e-30), torch.nan)
    unit_scale = np.nan_to_num(torch.nanmean(unit, dim=0).cpu().numpy(), nan=1.0)
    scaling_summary = _add_latent_scaling(
        table, stats, w_dec, labels, scaling_ids, a, b, name_a, name_b, lo, hi, same_basis,
        unit_scale,
    )  # fmt: skip
    summary = summarize(
        table,
        stats,
        source,
        labels=labels,
        name_a=name_a,
        name_b=name_b,
        split=(split_name, lo, hi),
        n_shared=n_shared,
        shared_decoder=shared_decoder,
        same_basis=same_basis,
        cosine_reason=_fmt_reason(same_basis, basis_reason, shared_decoder),
        domain_shares=domain_shares,
        scaling_summary=scaling_summary,
        k=getattr(cfg, "k", None),
        widths=widths,
    )
    if attribution is not None:
        summary["experts"] = expert_summary(
            stats.experts, attribution, labels,
            [c for c in class_names(name_a, name_b) if c != DEAD],
            min_expert_firings,
        )  # fmt: skip
    summary["evaluated_on"] = evaluated_on
    summary["reconstruction"].update(
        _pooled_normalized(stats.sse, stats.sst, normalized_unit_factors(cc, acts_or_store)),
        evaluated_on=evaluated_on,
    )

    panel_ids = _panel_latents(table, class_names(name_a, name_b), panels_per_class, stats)
    centers = {j: context_centers(stats.top_indices, j, n_top_contexts) for j in panel_ids}
    contexts = build_contexts(cc, source, centers, tokenizer=tokenizer, window=context_window)
    details: dict[int, dict[str, Any]] = {}
    for j in panel_ids:
        details[j] = {
            "contexts": contexts.get(j, []),
            "expert_counts": (
                stats.expert_counts[j].astype(int).tolist()
                if stats.expert_counts is not None
                else None
            ),
            "expert_layers": (
                expert_detail(stats.experts, j) if stats.experts is not None else None
            ),
            "domain_shares": (
                {d: _finite(domain_shares[j, i]) for i, d in enumerate(source.domain_names)}
                if domain_shares is not None
                else None
            ),
        }
    config = {
        "split": {"name": split_name, "lo": lo, "hi": hi},
        "direction": {"A": name_a, "B": name_b},
        "model_names": list(source.model_names),
        "domain_names": list(source.domain_names),
        "max_tokens": max_tokens,
        "n_tokens_analysed": n,
        "n_tokens_available": source.n_tokens,
        "evaluated_on": evaluated_on,
        "n_token_ranges": len(ranges),
        "batch_size": batch_size,
        "n_top_contexts": n_top_contexts,
        "context_window": context_window,
        "latent_scaling": latent_scaling,
        "min_expert_firings": min_expert_firings,
        "panels_per_class": panels_per_class,
        "same_basis": same_basis,
        "sparse_decode": stats.sparse_decode,
        "tokenizer": getattr(tokenizer, "name", None) if tokenizer is not None else None,
        "crosscoder": _crosscoder_config(cc),
        "store_manifest": source.manifest,
    }
    return FeatureDiff(
        table=table,
        summary=summary,
        config=config,
        details=details,
        top_indices=stats.top_indices,
        top_values=stats.top_values,
        expert_counts=stats.expert_counts,
        crosscoder=cc,
        source=source,
        tokenizer=tokenizer,
    )


def _add_latent_scaling(
    table: pd.DataFrame,
    stats: PassStats,
    w_dec: torch.Tensor,
    labels: np.ndarray,
    ids: np.ndarray,
    a: int,
    b: int,
    name_a: str,
    name_b: str,
    lo: float,
    hi: float,
    same_basis: bool,
    unit_scale: np.ndarray,
) -> dict[str, Any]:
    """Latent-scaling columns for the live model-specific latents (see latent_scaling.py)."""
    d_sae = len(table)
    nan = {
        key: np.full(d_sae, np.nan)
        for key in (
            f"scaling_signal_{name_a}", f"scaling_signal_{name_b}", f"scaling_share_{name_a}",
            f"scaling_share_{name_b}", "scaling_ratio", "scaling_ratio_rec", "scaling_share_rec",
            f"beta_err_{name_a}", f"beta_err_{name_b}", f"beta_rec_{name_a}",
            f"beta_rec_{name_b}", "nu_err", "nu_rec",
        )
    }  # fmt: skip
    cols: dict[str, np.ndarray] = {**nan, "scaling_artifact": np.zeros(d_sae, dtype=bool)}
    tol_a, tol_b = lo / (1 - lo), (1 - hi) / hi
    sums = stats.scaling
    if sums is not None:
        live = np.isin(labels[sums.latents], [f"{name_a}-only", f"{name_b}-only"])
        sums = sums.subset(live)
    if sums is not None and len(sums.latents):
        ids = sums.latents
        is_b = labels[ids] == f"{name_b}-only"
        own, other = np.where(is_b, b, a), np.where(is_b, a, b)
        tol = np.where(is_b, tol_b, tol_a)
        w = w_dec.double().cpu().numpy()
        free = free_direction_scaling(
            sums, w, stats.fire_count, stats.act_sum, stats.act_sq_sum, own, other, tol,
            unit_scale,
        )  # fmt: skip

        for name, mine in ((name_a, ~is_b), (name_b, is_b)):
            for key in ("signal", "share"):
                cols[f"scaling_{key}_{name}"][ids] = np.where(
                    mine, free[f"{key}_own"], free[f"{key}_other"]
                )
        cols["scaling_ratio"][ids] = free["ratio_act"]
        cols["scaling_ratio_rec"][ids] = free["ratio_rec"]
        cols["scaling_share_rec"][ids] = free["share_rec_other"]
        flags = free["artifact"]
        if same_basis:
            minder = own_direction_scaling(sums, w, stats.act_sq_sum, own, other, tol, unit_scale)
            for name, mine in ((name_a, ~is_b), (name_b, is_b)):
                for target in ("err", "rec"):
                    cols[f"beta_{target}_{name}"][ids] = np.where(
                        mine, minder[f"beta_{target}_own"], minder[f"beta_{target}_other"]
                    )
            cols["nu_err"][ids] = minder["nu_err"]
            cols["nu_rec"][ids] = minder["nu_rec"]
            flags = minder["artifact"]
        cols["scaling_artifact"][ids] = flags
    n_computed = 0 if sums is None else len(sums.latents)
    for key, value in cols.items():
        table[key] = value
    flagged = {
        cls: int(table.loc[table["class"] == cls, "scaling_artifact"].sum())
        for cls in (f"{name_a}-only", f"{name_b}-only")
    }
    tolerance = {f"{name_a}-only": tol_a, f"{name_b}-only": tol_b}
    if same_basis:
        return {
            "computed": bool(n_computed),
            "n_latents": int(n_computed),
            "n_flagged": flagged,
            "tolerance": tolerance,
            "form": "own-direction (Minder, Dumas et al.; same_basis=True)",
            "columns": ["nu_err", "nu_rec"],
            "direction": "the specific model's decoder vector in both models (shared basis)",
            "targets": {
                "err": "x - x_hat + f d (the error with the latent's own contribution added back)",
                "rec": "x_hat (the full reconstruction, decoder bias included)",
            },
            "rule": (
                "beta = <d_own, sum f y> / (|d_own|^2 sum f^2); nu = beta_other / beta_own; a "
                "latent is flagged when nu_err or nu_rec exceeds the norm ratio its class allows "
                "(lo/(1-lo) or (1-hi)/hi)"
            ),
        }
    return {
        "computed": bool(n_computed),
        "n_latents": int(n_computed),
        "n_flagged": flagged,
        "tolerance": tolerance,
        "min_share": MIN_SHARE,
        "form": "free direction (unrelated bases; same_basis=False)",
        "columns": ["scaling_ratio", "scaling_ratio_rec"],
        "direction": "fitted freely in each model's space over the tokens where the latent fires",
        "targets": {
            "act": "each model's activation x (own and other model)",
            "rec": "the other model's reconstruction without the latent, x_hat - f d "
            "(decoder bias included)",
        },
        "rule": (
            "fit y ~ a + v f over the latent's firing tokens (intercept; chance part of |v|^2 "
            "removed); ratio = s_other |v_other| / (s_own |v_own(x)|) in the classes' units; a "
            "latent is flagged when the ratio on the other model's activation or on its "
            "reconstruction without the latent exceeds the norm ratio its class allows "
            f"(lo/(1-lo) or (1-hi)/hi) and that fit explains >= {MIN_SHARE:g} of the other "
            "model's variance on those tokens"
        ),
    }


def _panel_latents(
    table: pd.DataFrame, classes: tuple[str, ...], per_class: int, stats: PassStats
) -> list[int]:
    mass = stats.act_sum
    out: list[int] = []
    for cls in classes:
        if cls == DEAD:
            continue
        ids = table.index[table["class"] == cls].to_numpy()
        out += [int(i) for i in ids[np.argsort(-mass[ids], kind="stable")][:per_class]]
    return sorted(out)


def _pooled_normalized(sse: np.ndarray, sst: np.ndarray, factors: Any) -> dict[str, Any]:
    """1 - sum_m SSE_m s_m^2 / sum_m SST_m s_m^2, in each model's normalized units."""
    if factors is None:  # no factor known: weigh each model by its own variance
        factors = 1.0 / np.sqrt(np.where(sst > 0, sst, np.nan))
    return {
        "fve_pooled_normalized": _finite(pooled_normalized_fve(sse, sst, factors)),
        "scaling_factors": [float(x) for x in np.asarray(factors, dtype=np.float64)],
    }
