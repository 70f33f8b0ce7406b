"""The latent explorer's data: for every live latent (or the top `per_class` of each class by
activation mass), its top-activating examples, examples from each activation band, an activation
histogram and (with the models) its logit effects.

One extra pass over the analysed tokens draws the band examples and the histograms
(`band_samples`); the top examples come from the diff's own pass. The examples' windows are then
read and encoded once (`window_contexts`), so the cost is at most one more pass whatever d_sae.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossdiff.analysis.classes import DEAD
from crossdiff.analysis.contexts import _merge_windows, _token_text, band_samples
from crossdiff.analysis.logit_effects import load_residual_models, logit_effects
from crossdiff.plumbing.common import CrossdiffError

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


def window_contexts(
    cc: Any,
    source: Any,
    centers: list[tuple[int, int]],
    *,
    window: int,
    batch_size: int = 1024,
) -> list[dict[str, Any]]:
    """One compact context per (latent, center token): each window token's id and the latent's
    activation on it, the window cut at the center's document (same doc id, consecutive
    positions). Every token of the union of the windows is read and encoded once, whatever the
    number of latents; memory holds only the requested (token, latent) values."""
    if not centers:
        return []
    n_tok = source.n_tokens
    width = 2 * window + 1
    lat = np.array([j for j, _ in centers], dtype=np.int64)
    cen = np.array([c for _, c in centers], dtype=np.int64)
    tokens = cen[:, None] + np.arange(-window, window + 1)[None, :]  # [n_ctx, width]
    valid = (tokens >= 0) & (tokens < n_tok)
    flat_tok = np.where(valid, tokens, -1).reshape(-1)
    flat_lat = np.repeat(lat, width)
    order = np.argsort(flat_tok, kind="stable")
    order = order[flat_tok[order] >= 0]
    sorted_tok = flat_tok[order]
    values = np.zeros(len(flat_tok), dtype=np.float64)
    blocks = _merge_windows(sorted(set(cen.tolist())), window, n_tok)
    meta_parts: list[dict[str, np.ndarray]] = []
    device, dtype = cc.W_dec.device, cc.W_dec.dtype
    with torch.no_grad():
        for block_start, block_stop in blocks:
            meta = source.read_metadata(block_start, block_stop)
            meta_parts.append({k: v.numpy() for k, v in meta.items() if v.ndim == 1})
            for start in range(block_start, block_stop, batch_size):
                stop = min(start + batch_size, block_stop)
                lo, hi = np.searchsorted(sorted_tok, [start, stop])
                if lo == hi:
                    continue
                x = source.read_acts(start, stop).to(device=device, dtype=dtype)
                pick = order[lo:hi]
                rows = torch.as_tensor(flat_tok[pick] - start, device=device)
                cols = torch.as_tensor(flat_lat[pick], device=device)
                values[pick] = cc.encode(x)[rows, cols].double().cpu().numpy()
    index = np.concatenate([np.arange(a, b) for a, b in blocks])
    meta_all = {
        k: np.concatenate([m[k] for m in meta_parts]) for k in (meta_parts[0] if meta_parts else {})
    }
    values = np.round(values.reshape(len(centers), width), 3)
    at = np.searchsorted(index, np.where(valid, tokens, index[0]))  # rows of meta_all

    def meta_of(key: str) -> np.ndarray:  # [n_ctx, width], -1 where unknown
        if key not in meta_all:
            return np.full(tokens.shape, -1, dtype=np.int64)
        return np.where(valid, meta_all[key][at].astype(np.int64), -1)

    docs, pos, ids, doms = (meta_of(k) for k in ("doc_ids", "positions", "token_ids", "domains"))
    offset = np.arange(-window, window + 1)[None, :]
    same = valid & (docs == docs[:, window : window + 1])
    same &= pos - pos[:, window : window + 1] == offset
    # the run of same-text tokens through the center: cumulative products outwards from it
    right = np.cumprod(same[:, window:], axis=1).astype(bool)
    left = np.cumprod(same[:, : window + 1][:, ::-1], axis=1)[:, ::-1].astype(bool)
    keep = np.concatenate([left[:, :-1], right], axis=1)
    first = window - left.sum(1) + 1
    n_domains = len(source.domain_names)
    out = []
    for row in range(len(centers)):
        k = keep[row]
        dom = int(doms[row, window])
        out.append(
            {
                "i": int(cen[row]),
                "a": float(values[row, window]),
                "d": dom if 0 <= dom < n_domains else None,
                "c": int(window - first[row]),
                "t": ids[row, k].tolist(),
                "v": values[row, k].tolist(),
            }
        )
    return out


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
    batch_size = int(diff.config.get("batch_size", 1024))
    picks, hist = band_samples(
        cc, source, ranges, latents, max_act, n_bands=n_bands, per_band=per_band, n_bins=n_bins,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip
    requests: list[tuple[int, int]] = []
    n_found_top: dict[int, int] = {}
    for row, j in enumerate(latents):
        top = [int(i) for i in diff.top_indices[j, :n_top] if i >= 0]
        n_found_top[j] = len(top)
        requests += [(j, c) for c in top]
        requests += [(j, int(i)) for i in picks[row].reshape(-1) if i >= 0]
    contexts = iter(window_contexts(cc, source, requests, window=window, batch_size=batch_size))
    entries: dict[str, Any] = {}
    for row, j in enumerate(latents):
        top = [next(contexts) for _ in range(n_found_top[j])]
        bands = []
        for b in range(n_bands):
            got = [next(contexts) for i in picks[row, b] if i >= 0]
            bands.append(sorted(got, key=lambda c: -c["a"]))
        entries[str(j)] = {
            "top": top,
            "bands": bands,
            "hist": hist[row].astype(int).tolist(),
            "max": float(max_act[row]),
        }
    used = sorted({t for e in entries.values() for g in [e["top"], *e["bands"]] for c in g
                   for t in c["t"]})  # fmt: skip
    vocab = {str(t): _token_text(diff.tokenizer, t) for t in used}
    domains = list(source.domain_names)
    names = list(source.model_names)
    loaded, hooks = load_residual_models(models, source.manifest, names)
    effects = logit_effects(
        cc.W_dec.detach(), latents, loaded, names, tokenizer=diff.tokenizer, k=n_logits
    )
    for j in latents:
        if effects[j]:
            entries[str(j)]["logits"] = effects[j]
    verification = (diff.summary.get("verification") or {}).get("latents") or {}
    for j, record in verification.items():  # screen-and-verify's record of a candidate
        if j in entries:
            entries[j]["verify"] = record
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
