"""The latent explorer's data: for every live latent (or the top `per_class` of each class by
activation mass), its top-activating examples, examples from each activation band, an activation
histogram and (with the models) its logit effects.

One extra pass over the analysed tokens draws the band examples and the histograms
(`band_samples`); the top examples come from the diff's own pass. Contexts are read and encoded
a chunk of latents at a time, so memory stays bounded by the chunk, not by d_sae.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crossdiff.analysis.classes import DEAD
from crossdiff.analysis.contexts import _token_text, band_samples, build_contexts
from crossdiff.analysis.logit_effects import load_residual_models, logit_effects
from crossdiff.common import CrossdiffError

EXPLORER_FORMAT = "crossdiff-explorer"
DEFAULT_PER_CLASS = 4096  # covers every class of a tiny run (d_sae ~1-4k) in full


def explorer_latents(table: Any, per_class: int) -> list[int]:
    """Live latents, the `per_class` of each class with the largest activation mass."""
    live = table[(table["class"] != DEAD) & (table["fire_count"] > 0)]
    mass = live["fire_count"].to_numpy() * np.nan_to_num(live["mean_activation"].to_numpy())
    out: list[int] = []
    for cls in dict.fromkeys(live["class"]):
        mask = (live["class"] == cls).to_numpy()
        ids = live["latent"].to_numpy()[mask]
        out += [int(i) for i in ids[np.argsort(-mass[mask], kind="stable")][:per_class]]
    return sorted(out)


def _compact(ctx: dict[str, Any], domains: list[str], vocab: dict[str, str]) -> dict[str, Any]:
    for i, text in zip(ctx["token_ids"], ctx["tokens"], strict=True):
        vocab.setdefault(str(i), text)
    return {
        "i": ctx["token_index"],
        "a": round(float(ctx["activation"]), 4),
        "d": domains.index(ctx["domain"]) if ctx["domain"] in domains else None,
        "c": ctx["center"],
        "t": ctx["token_ids"],
        "v": [round(float(v), 3) for v in ctx["activations"]],
    }


def explore(
    diff: Any,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    n_top: int = 10,
    n_bands: int = 4,
    per_band: int = 3,
    n_bins: int = 24,
    models: dict[str, Any] | str | Path | None = None,
    n_logits: int = 10,
    chunk: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """The explorer data of a FeatureDiff that holds its crosscoder and tokens (JSON-ready).

    models: loaded models by name, or a folder with one model folder per model name; logit
    effects are computed for the models whose hook point is on the residual stream.
    """
    cc, source = diff.crosscoder, diff.source
    if cc is None or source is None:
        raise CrossdiffError(
            "this FeatureDiff holds no crosscoder or data (it was loaded from JSON); run "
            "diff_features again to build the explorer"
        )
    if per_class < 0 or n_top < 1 or n_bands < 1 or per_band < 0 or n_bins < 1:
        raise CrossdiffError(
            f"explorer settings must be per_class >= 0, n_top, n_bands, n_bins >= 1, per_band >= "
            f"0; got {per_class}, {n_top}, {n_bands}, {n_bins}, {per_band}"
        )
    latents = explorer_latents(diff.table, per_class)
    n_top = min(n_top, diff.top_indices.shape[1])
    window = int(diff.config["context_window"])
    max_act = diff.top_values[latents, 0] if latents else np.zeros(0)
    ranges = source.ranges(diff.config.get("max_tokens"))
    picks, hist = band_samples(
        cc, source, ranges, latents, max_act, n_bands=n_bands, per_band=per_band, n_bins=n_bins,
        batch_size=int(diff.config.get("batch_size", 1024)), seed=seed,
    )  # fmt: skip
    domains = list(source.domain_names)
    vocab: dict[str, str] = {}
    entries: dict[str, Any] = {}
    for lo in range(0, len(latents), chunk):
        ids = latents[lo : lo + chunk]
        centers: dict[int, list[int]] = {}
        for row, j in enumerate(ids, start=lo):
            top = [int(i) for i in diff.top_indices[j, :n_top] if i >= 0]
            bands = [int(i) for i in picks[row].reshape(-1) if i >= 0]
            centers[j] = top + bands
        contexts = build_contexts(cc, source, centers, tokenizer=diff.tokenizer, window=window)
        for row, j in enumerate(ids, start=lo):
            found = [_compact(c, domains, vocab) for c in contexts.get(j, [])]
            n_found_top = sum(1 for i in diff.top_indices[j, :n_top] if i >= 0)
            top, rest = found[:n_found_top], iter(found[n_found_top:])
            bands = []
            for b in range(n_bands):
                got = [next(rest) for i in picks[row, b] if i >= 0]
                bands.append(sorted(got, key=lambda c: -c["a"]))
            entries[str(j)] = {
                "top": top,
                "bands": bands,
                "hist": hist[row].astype(int).tolist(),
                "max": float(max_act[row]),
            }
    names = list(source.model_names)
    loaded, hooks = load_residual_models(models, source.manifest, names)
    effects = logit_effects(
        cc.W_dec.detach(), latents, loaded, names, tokenizer=diff.tokenizer, k=n_logits
    )
    for j in latents:
        if effects[j]:
            entries[str(j)]["logits"] = effects[j]
    if hooks and not loaded:
        logit_note = "the models were not given, so there are no logit effects"
    elif not hooks:
        logit_note = (
            "no model's hook point is known to be on the residual stream (the store's manifest "
            "names the hooks), so no logit effects"
        )
    else:
        logit_note = (
            "W_U . (final norm weights * centred decoder vector), raw activation units; the path "
            "through later blocks is ignored"
        )
    return {
        "format": EXPLORER_FORMAT,
        "format_version": 1,
        "settings": dict(
            per_class=per_class,
            n_top=n_top,
            n_bands=n_bands,
            per_band=per_band,
            n_bins=n_bins,
            window=window,
            seed=seed,
        ),  # fmt: skip
        "bands": "equal-width activation bands over (0, max]; band b holds (b/n, (b+1)/n] * max",
        "domain_names": domains,
        "logit_models": {n: hooks[n] for n in loaded},
        "logit_note": logit_note,
        "n_latents": len(latents),
        "vocab": vocab,
        "latents": entries,
    }


def token_text(vocab: dict[str, str], token_id: int) -> str:
    return vocab.get(str(token_id), _token_text(None, token_id))


VISIBLE_WHITESPACE = {"\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}  # ↵ → ␍


def visible_whitespace(text: str) -> str:
    """Newlines, tabs and carriage returns as visible marks, so one context stays one line."""
    for raw, mark in VISIBLE_WHITESPACE.items():
        text = text.replace(raw, mark)
    return text
