"""Top-activating contexts of a latent: token windows with text and the activation on each token."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossdiff.analysis.feature_diff import FeatureDiff
from crossdiff.analysis.source import TokenSource
from crossdiff.plumbing.common import CrossdiffError


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None or token_id < 0:
        return f"<{token_id}>"
    try:
        return tokenizer.decode([int(token_id)])
    except Exception:  # a tokenizer that cannot decode one id alone still gets a readable cell
        return f"<{token_id}>"


def _merge_windows(centers: list[int], window: int, n_tokens: int) -> list[tuple[int, int]]:
    spans = sorted((max(0, c - window), min(n_tokens, c + window + 1)) for c in centers)
    merged: list[list[int]] = []
    for start, stop in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def build_contexts(
    cc: Any,
    source: TokenSource,
    centers_by_latent: dict[int, list[int]],
    *,
    tokenizer: Any = None,
    window: int = 5,
    encode_batch: int = 1024,
) -> dict[int, list[dict[str, Any]]]:
    """For each latent, one context per center token (store index), in the given order.

    A window stops at a document boundary: a neighbour is kept only if it has the center's doc id
    and its position is the center's plus its offset (so subsampled or packed stores never mix
    texts).
    """
    latents = sorted(centers_by_latent)
    if not latents:
        return {}
    all_centers = sorted({c for cs in centers_by_latent.values() for c in cs})
    if not all_centers:
        return {j: [] for j in latents}
    blocks = _merge_windows(all_centers, window, source.n_tokens)
    columns = torch.as_tensor(latents, dtype=torch.int64)
    col_of = {j: i for i, j in enumerate(latents)}
    device, dtype = cc.W_dec.device, cc.W_dec.dtype
    index = torch.cat([torch.arange(start, stop) for start, stop in blocks])
    raw = torch.cat([source.read_acts(start, stop) for start, stop in blocks])
    metas = [source.read_metadata(start, stop) for start, stop in blocks]
    meta_cat = {k: torch.cat([m[k] for m in metas]) for k in (metas[0] if metas else {})}
    parts = []
    with torch.no_grad():  # inference encoding is per token, so any grouping gives the same values
        for i in range(0, len(raw), encode_batch):
            f = cc.encode(raw[i : i + encode_batch].to(device=device, dtype=dtype))
            parts.append(f[:, columns.to(device)].float().cpu())
    acts = torch.cat(parts).tolist()
    row_of = {t: i for i, t in enumerate(index.tolist())}
    meta = {k: v.tolist() for k, v in meta_cat.items() if v.ndim == 1}

    def meta_int(t: int, key: str) -> int:
        return int(meta[key][row_of[t]]) if key in meta else -1

    def same_text(t: int, center: int) -> bool:
        same_doc = meta_int(t, "doc_ids") == meta_int(center, "doc_ids")
        in_order = meta_int(t, "positions") == meta_int(center, "positions") + (t - center)
        return same_doc and in_order

    out: dict[int, list[dict[str, Any]]] = {}
    for j in latents:
        col = col_of[j]
        contexts = []
        for c in centers_by_latent[j]:
            run = [c]  # grow the window outwards until it leaves the center's text
            for t in range(c - 1, max(-1, c - window - 1), -1):
                if not same_text(t, c):
                    break
                run.insert(0, t)
            for t in range(c + 1, min(source.n_tokens, c + window + 1)):
                if not same_text(t, c):
                    break
                run.append(t)
            ids = [meta_int(t, "token_ids") for t in run]
            tokens = [_token_text(tokenizer, i) for i in ids]
            domain_index = meta_int(c, "domains")
            names = source.domain_names
            contexts.append(
                {
                    "token_index": int(c),
                    "activation": acts[row_of[c]][col],
                    "domain": names[domain_index] if 0 <= domain_index < len(names) else None,
                    "doc_id": meta_int(c, "doc_ids"),
                    "center": run.index(c),
                    "tokens": tokens,
                    "token_ids": ids,
                    "activations": [acts[row_of[t]][col] for t in run],
                    "text": "".join(tokens),
                }
            )
        out[j] = contexts
    return out


def _stream_top(
    cc: Any, source: TokenSource, latent: int, n: int, max_tokens: int | None, batch_size: int
) -> list[int]:
    best_vals = torch.zeros(0)
    best_idx = torch.zeros(0, dtype=torch.int64)
    device, dtype = cc.W_dec.device, cc.W_dec.dtype
    with torch.no_grad():
        for range_start, range_stop in source.ranges(max_tokens):
            for start in range(range_start, range_stop, batch_size):
                stop = min(start + batch_size, range_stop)
                x = source.read_acts(start, stop).to(device=device, dtype=dtype)
                col = cc.encode(x)[:, latent].float().cpu()
                vals = torch.cat([best_vals, col])
                idx = torch.cat([best_idx, torch.arange(start, stop)])
                best_vals, pick = vals.topk(min(n, len(vals)))
                best_idx = idx[pick]
    return [int(i) for v, i in zip(best_vals, best_idx, strict=True) if v > 0]


def top_contexts(
    diff_or_source: Any,
    latent: int,
    *,
    cc: Any = None,
    metadata: dict[str, Tensor] | None = None,
    tokenizer: Any = None,
    n_contexts: int | None = None,
    window: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1024,
    model_names: tuple[str, ...] | None = None,
    domain_names: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """The `n_contexts` highest activations of one latent, each with `window` tokens either side.

    Pass a FeatureDiff (uses the top tokens its pass recorded, no new pass), or a store / activation
    tensor together with `cc=` (one streaming pass for this latent). Each context is a dict with
    token_index, activation, domain, doc_id, center (index of the top token in the window), tokens,
    token_ids, activations (of this latent on each window token) and text. n_contexts and window
    default to the diff's settings (20 and 5 without a diff).
    """
    if isinstance(diff_or_source, FeatureDiff):
        diff = diff_or_source
        cc = cc if cc is not None else diff.crosscoder
        source = diff.source
        tokenizer = tokenizer if tokenizer is not None else diff.tokenizer
        if cc is None or source is None:
            raise CrossdiffError(
                "this FeatureDiff holds no crosscoder or data (it was loaded from JSON); pass the "
                "store or activations and cc= instead"
            )
        n_contexts = diff.top_indices.shape[1] if n_contexts is None else n_contexts
        window = int(diff.config["context_window"]) if window is None else window
        d_sae = diff.top_indices.shape[0]
        if not 0 <= latent < d_sae:
            raise CrossdiffError(f"latent {latent} is out of range; the crosscoder has {d_sae}")
        if n_contexts > diff.top_indices.shape[1]:
            raise CrossdiffError(
                f"the diff recorded {diff.top_indices.shape[1]} top tokens per latent but "
                f"{n_contexts} were asked for; re-run diff_features(n_top_contexts={n_contexts})"
            )
        centers = [int(i) for i in diff.top_indices[latent, :n_contexts] if i >= 0]
    else:
        if cc is None:
            raise CrossdiffError("top_contexts on a store or a tensor needs the crosscoder: cc=...")
        n_contexts = 20 if n_contexts is None else n_contexts
        window = 5 if window is None else window
        source = TokenSource(diff_or_source, metadata, model_names, domain_names)
        d_sae = int(cc.W_dec.shape[0])
        if not 0 <= latent < d_sae:
            raise CrossdiffError(f"latent {latent} is out of range; the crosscoder has {d_sae}")
        centers = _stream_top(cc, source, latent, n_contexts, max_tokens, batch_size)
    contexts = build_contexts(cc, source, {latent: centers}, tokenizer=tokenizer, window=window)
    return contexts.get(latent, [])


def context_centers(top_indices: np.ndarray, latent: int, n: int) -> list[int]:
    return [int(i) for i in top_indices[latent, :n] if i >= 0]


def band_samples(
    cc: Any,
    source: TokenSource,
    ranges: list[tuple[int, int]],
    latents: list[int],
    max_act: np.ndarray,
    *,
    n_bands: int = 4,
    per_band: int = 3,
    n_bins: int = 24,
    batch_size: int = 1024,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass: for each latent, `per_band` tokens drawn uniformly at random from each of
    `n_bands` equal-width activation bands over (0, max_act] (SAEDashboard's interval examples),
    and a histogram of its nonzero activations in `n_bins` equal bins over (0, max_act].

    Returns (centers [n_latents, n_bands, per_band], store index, -1 where the band has fewer
    firings; histogram [n_latents, n_bins]). Memory: [n_latents, n_bands, per_band] plus a batch;
    a fixed seed gives the same samples on every run.
    """
    n_lat = len(latents)
    groups = n_lat * n_bands
    keys = torch.full((groups, per_band), -1.0, dtype=torch.float64)
    picks = torch.full((groups, per_band), -1, dtype=torch.int64)
    hist = torch.zeros(n_lat * n_bins, dtype=torch.int64)
    if n_lat == 0:
        return picks.view(0, n_bands, per_band).numpy(), hist.view(0, n_bins).numpy()
    device, dtype = cc.W_dec.device, cc.W_dec.dtype
    columns = torch.as_tensor(latents, dtype=torch.int64, device=device)
    top = torch.as_tensor(np.asarray(max_act, dtype=np.float64)).clamp_min(1e-30)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for range_start, range_stop in ranges:
            for start in range(range_start, range_stop, batch_size):
                stop = min(start + batch_size, range_stop)
                x = source.read_acts(start, stop).to(device=device, dtype=dtype)
                sub = cc.encode(x)[:, columns].double().cpu()
                rows, cols = torch.nonzero(sub > 0, as_tuple=True)
                if not len(rows):
                    continue
                rel = (sub[rows, cols] / top[cols]).clamp(0.0, 1.0)
                bins = ((rel * n_bins).ceil().long() - 1).clamp(0, n_bins - 1)
                hist += torch.bincount(cols * n_bins + bins, minlength=n_lat * n_bins)
                band = ((rel * n_bands).ceil().long() - 1).clamp(0, n_bands - 1)
                group = cols * n_bands + band
                key = torch.rand(len(rows), generator=gen, dtype=torch.float64)
                # reservoir by random priority: keep the per_band largest keys of each group
                keep = key > keys[group].min(dim=1).values
                if keep.any():
                    _merge_samples(keys, picks, group[keep], key[keep], rows[keep] + start)
    return picks.view(n_lat, n_bands, per_band).numpy(), hist.view(n_lat, n_bins).numpy()


def _merge_samples(keys: Tensor, picks: Tensor, group: Tensor, key: Tensor, index: Tensor) -> None:
    per = keys.shape[1]
    touched = torch.unique(group)
    old_keys, old_idx = keys[touched], picks[touched]
    old_valid = old_keys >= 0
    all_group = torch.cat([touched[:, None].expand(-1, per)[old_valid], group])
    all_key = torch.cat([old_keys[old_valid], key])
    all_idx = torch.cat([old_idx[old_valid], index])
    order = torch.argsort(all_key, descending=True, stable=True)
    order = order[torch.argsort(all_group[order], stable=True)]
    g, kv, iv = all_group[order], all_key[order], all_idx[order]
    first = torch.searchsorted(g, g, side="left")
    rank = torch.arange(len(g)) - first
    ok = rank < per
    keys[touched] = -1.0
    picks[touched] = -1
    keys[g[ok], rank[ok]] = kv[ok]
    picks[g[ok], rank[ok]] = iv[ok]
