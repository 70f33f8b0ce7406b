"""diff_features: the per-latent table and the class summary of a trained crosscoder."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch

from crossdiff.activations.source import check_activations
from crossdiff.activations.store import evaluation_part
from crossdiff.analysis.accumulate import PassStats, run_pass
from crossdiff.analysis.attribution import pair_splits
from crossdiff.analysis.classes import (
    DEAD,
    class_names,
    classify,
    classify_partition,
    decoder_cosine,
    partition_owner,
    relative_norm,
    resolve_split,
)
from crossdiff.analysis.contexts import build_contexts, context_centers
from crossdiff.analysis.diff_inputs import (
    check_options,
    checked_decoder,
    checked_widths,
    choose_basis,
    cosine_reason,
    resolve_direction,
)
from crossdiff.analysis.experts import (
    DEFAULT_MIN_FIRINGS,
    add_expert_columns,
    attribute,
    expert_detail,
    expert_summary,
)
from crossdiff.analysis.feature_diff import FeatureDiff
from crossdiff.analysis.partition_view import add_partition_columns, partition_summary
from crossdiff.analysis.scaling_columns import add_latent_scaling
from crossdiff.analysis.source import TokenSource
from crossdiff.analysis.summary import domain_lift, summarize
from crossdiff.analysis.summary import finite as _finite
from crossdiff.crosscoder.compatibility import check_reads, resolve_tokenizer
from crossdiff.crosscoder.fve import pooled_normalized_fve
from crossdiff.crosscoder.metrics import normalized_unit_factors
from crossdiff.plumbing.api_checks import check_crosscoder


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
    allow_mismatch: bool = False,
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
    tokenizer: a tokenizer object, or a folder / tokenizer.json path or Hugging Face name to load.
    allow_mismatch: apply `cc` to a store other than the one it was trained on (other models,
    hooks or tokens; or a tokenizer other than the store's), which is refused by default; the
    differences go to summary["mismatch"] and its warnings.
    """
    check_crosscoder(cc, "diff_features")
    check_activations(acts_or_store, "diff_features", "acts_or_store")
    tokenizer = resolve_tokenizer(tokenizer)
    mismatch = check_reads(
        cc, acts_or_store, tokenizer=tokenizer, allow_mismatch=allow_mismatch,
        where="diff_features",
    )  # fmt: skip
    split_name, lo, hi = resolve_split(split)
    acts_or_store, evaluated_on = evaluation_part(acts_or_store, part)
    source = TokenSource(acts_or_store, metadata, model_names, domain_names)
    w_dec = checked_decoder(cc, source)
    check_options(n_top_contexts, context_window, batch_size, min_expert_firings)
    d_sae, n_models_cc, d_model = w_dec.shape
    a, b = resolve_direction(
        tuple(direction) if direction is not None else None, source.model_names
    )
    name_a, name_b = source.model_names[a], source.model_names[b]
    cfg = getattr(cc, "cfg", None)
    n_shared = int(getattr(cfg, "n_shared", 0) or 0)
    shared_decoder = str(getattr(cfg, "shared_decoder", "free") or "free")
    # tied designated latents keep their own class; free ones are classed by relative norm
    n_tied = n_shared if shared_decoder == "tied" else 0
    same_basis, basis_reason = choose_basis(same_basis)
    widths = checked_widths(cfg, d_model, n_models_cc, same_basis, acts_or_store)

    norms_t = (
        cc.decoder_norms().detach() if hasattr(cc, "decoder_norms") else w_dec.norm(dim=-1)
    ).float()
    r = relative_norm(norms_t, a, b).cpu().numpy().astype(np.float64)
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
    labels = classify(r, stats.fire_count > 0, n_tied, lo, hi, name_a, name_b)
    norm_labels, owner = labels, partition_owner(cc, d_sae)
    if owner is not None:  # a DFC: classes from its partition, the relative-norm view beside
        labels = classify_partition(owner, stats.fire_count > 0, n_tied, source.model_names)
    table = _latent_table(stats, source, labels, norms_t, r, w_dec, a, b, n_shared)
    if owner is not None:
        add_partition_columns(table, owner, norm_labels, source.model_names)
    domain_shares = _add_domain_columns(table, stats, source)
    attribution = None
    if stats.experts is not None:
        attribution = attribute(stats.experts, min_expert_firings)
        add_expert_columns(table, attribution)

    scaling_summary = add_latent_scaling(
        table, stats, w_dec, labels, scaling_ids, a, b, name_a, name_b, lo, hi, same_basis,
        _unit_scale(w_dec, norms_t),
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
        cosine_reason=cosine_reason(same_basis, basis_reason, shared_decoder),
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
    if owner is not None:
        summary["partition"] = partition_summary(
            cfg, labels, norm_labels, class_names(name_a, name_b), (lo, hi)
        )
    summary["evaluated_on"] = evaluated_on
    summary["pair_splits"] = pair_splits(table, name_a, name_b)
    if mismatch:  # allowed: a deliberate transfer, said in the report
        summary["mismatch"] = mismatch
        summary["warnings"].append(
            "the crosscoder was applied with allow_mismatch to a store it was not trained on: "
            + "; ".join(mismatch)
        )
    summary["reconstruction"].update(
        _pooled_normalized(stats.sse, stats.sst, normalized_unit_factors(cc, acts_or_store)),
        evaluated_on=evaluated_on,
    )

    panel_ids = _panel_latents(table, class_names(name_a, name_b), panels_per_class, stats)
    centers = {j: context_centers(stats.top_indices, j, n_top_contexts) for j in panel_ids}
    contexts = build_contexts(cc, source, centers, tokenizer=tokenizer, window=context_window)
    details = {
        j: _panel_detail(j, contexts.get(j, []), stats, source, domain_shares) for j in panel_ids
    }
    config = {
        "split": {"name": split_name, "lo": lo, "hi": hi},
        "direction": {"A": name_a, "B": name_b},
        "model_names": list(source.model_names),
        "domain_names": list(source.domain_names),
        "max_tokens": max_tokens,
        "n_tokens_analysed": stats.n_tokens,
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


def _latent_table(
    stats: PassStats,
    source: TokenSource,
    labels: np.ndarray,
    norms_t: torch.Tensor,
    r: np.ndarray,
    w_dec: torch.Tensor,
    a: int,
    b: int,
    n_shared: int,
) -> pd.DataFrame:
    """One row per latent: class, decoder norms and cosine, density and mean activation."""
    d_sae = len(labels)
    name_a, name_b = source.model_names[a], source.model_names[b]
    norms = norms_t.cpu().numpy().astype(np.float64)
    fires = stats.fire_count > 0
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
            "decoder_cosine": decoder_cosine(w_dec, a, b).cpu().numpy().astype(np.float64),
            "density": stats.fire_count / stats.n_tokens,
            "fire_count": stats.fire_count.astype(np.int64),
            "mean_activation": mean_act,
        }
    )
    for m, name in enumerate(source.model_names):
        if m not in (a, b):
            table[f"norm_{name}"] = norms[:, m]
    return table


def _add_domain_columns(
    table: pd.DataFrame, stats: PassStats, source: TokenSource
) -> np.ndarray | None:
    """share_{domain} and lift_{domain} columns; returns the shares [d_sae, n_domains]."""
    if stats.domain_mass is None:
        return None
    mass_total = stats.domain_mass.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        domain_shares = np.where(mass_total > 0, stats.domain_mass / mass_total, np.nan)
    for i, dname in enumerate(source.domain_names):
        table[f"share_{dname}"] = domain_shares[:, i]
    lift = domain_lift(domain_shares, stats.domain_tokens)
    for i, dname in enumerate(source.domain_names):
        table[f"lift_{dname}"] = lift[:, i]
    return domain_shares


def _unit_scale(w_dec: torch.Tensor, norms_t: torch.Tensor) -> np.ndarray:
    """Per model, decoder_norms() over the stored norms: decoder_norms() may be in training
    units, and latent scaling's norms must be in the same units."""
    raw = w_dec.float().norm(dim=-1)
    with torch.no_grad():
        unit = torch.where(raw > 0, norms_t / raw.clamp_min(1e-30), torch.nan)
    return np.nan_to_num(torch.nanmean(unit, dim=0).cpu().numpy(), nan=1.0)


def _panel_detail(
    j: int,
    contexts: list[Any],
    stats: PassStats,
    source: TokenSource,
    domain_shares: np.ndarray | None,
) -> dict[str, Any]:
    """What a report shows of latent j beyond its table row."""
    return {
        "contexts": contexts,
        "expert_counts": (
            stats.expert_counts[j].astype(int).tolist() if stats.expert_counts is not None else None
        ),
        "expert_layers": (expert_detail(stats.experts, j) if stats.experts is not None else None),
        "domain_shares": (
            {d: _finite(domain_shares[j, i]) for i, d in enumerate(source.domain_names)}
            if domain_shares is not None
            else None
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
