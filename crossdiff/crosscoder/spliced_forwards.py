"""The spliced-loss evaluation with as little model work as it needs (spliced_loss.py says what is
measured; the numbers are those of one forward pass per model, scope and kind):

- one clean forward per model and batch gives the clean CE, the sites' activations (kept for the
  reconstruction, so the crosscoder reads each token once) and the mean-ablation values together;
- the patched forwards start at the first paired layer from the clean residual stream there
  (everything before it is the same as the clean run), and the spliced, zero- and mean-ablated
  kinds of a scope run as one stacked batch;
- the clean, zero- and mean-ablated sums do not depend on the crosscoder: with a cache folder
  they are kept under a key of the models' weights, the token rows, the sites and the options,
  so a rerun with another crosscoder runs only the spliced forwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossdiff.activations.identity import weights_hash
from crossdiff.activations.runner import hook_layer
from crossdiff.crosscoder.splicer import Splicer
from crossdiff.plumbing.common import CrossdiffError, write_json_atomic

CACHE_VERSION = 1  # bump when what the cached sums mean changes
KEEP_BYTES = 1 << 30  # clean activations kept between the passes up to this size, else re-read
STACK_BYTES = 1 << 29  # logits of one stacked forward up to this size, else one kind at a time
ABLATIONS = ("clean", "zero", "mean")


def start_layer(model: Any, hooks: Sequence[str]) -> int | None:
    """The first block any of `hooks` is in (the patched runs start there); None when a hook
    is outside the blocks (embeddings, final norm), it is block 0, or the model is a
    TransformerBridge (whose forward is Hugging Face's own loop: no `start_at_layer`)."""
    from crossdiff.activations.bridge import is_bridge

    if is_bridge(model):
        return None
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers) or min(layers) == 0:  # type: ignore[type-var]
        return None
    return min(layers)  # type: ignore[type-var]


def scopes(splicer: Splicer, m: int, per_site: bool) -> list[Any]:
    out: list[Any] = ["all"]
    if per_site and len(splicer.hooks[m]) > 1:
        out += list(range(len(splicer.hooks[m])))
    return out


def capture(splicer: Splicer, m: int, tokens: Tensor, start: int | None,
            loss: list[float] | None = None) -> tuple[list[Tensor], Tensor | None]:  # fmt: skip
    """(model m's clean site activations, its residual stream entering block `start`)."""
    if start is None:
        return splicer.capture(m, tokens, loss), None
    resid: dict[str, Tensor] = {}

    def save(value: Tensor, hook: Any) -> None:
        resid["x"] = value.detach()

    name = f"blocks.{start}.hook_resid_pre"
    model = splicer.models[m]
    with model.hooks(fwd_hooks=[(name, save)]):
        sites = splicer.capture(m, tokens, loss)
    return sites, resid["x"]


def patched_sums(
    splicer: Splicer,
    m: int,
    tokens: Tensor,
    keep: Tensor,
    resid: Tensor | None,
    start: int | None,
    sites: list[int],
    values: list[list[Tensor]],
) -> list[float]:
    """Summed next-token CE of model m with its `sites` replaced (at kept positions) by each of
    `values` (per kind, per site), the kinds stacked along the batch."""
    model, device = splicer.models[m], splicer.device(m)
    n_kinds, (batch, pos) = len(values), tokens.shape
    tok = tokens.to(device).repeat(n_kinds, 1)
    mask = keep.to(device).repeat(n_kinds, 1)[..., None]
    fwd_hooks = []
    for s in sites:
        width = splicer.site_widths[m][s]
        value = torch.cat([v[s].to(device).expand(batch, pos, width) for v in values])

        def patch(act: Tensor, hook: Any, value: Tensor = value) -> Tensor:
            return torch.where(mask, value.to(act.dtype), act)

        fwd_hooks.append((splicer.hooks[m][s], patch))
    if start is None:
        per_token = model.run_with_hooks(
            tok, return_type="loss", loss_per_token=True, fwd_hooks=fwd_hooks
        )
    else:
        per_token = model.run_with_hooks(
            resid.repeat(n_kinds, 1, 1),  # type: ignore[union-attr]
            start_at_layer=start, tokens=tok, return_type="loss", loss_per_token=True,
            fwd_hooks=fwd_hooks,
        )  # fmt: skip
    return per_token.to(torch.float64).reshape(n_kinds, -1).sum(1).tolist()


def evaluate(
    splicer: Splicer,
    given_means: list[list[Tensor]] | None,
    per_site: bool,
    known: dict[tuple, float] | None = None,
) -> dict[tuple, float]:
    """Summed CE per (model, scope, kind) as Splicer's one-forward-per-kind loop gives it;
    `known` (the cached clean and ablation sums) leaves only the spliced forwards to run."""
    n_models = len(splicer.models)
    starts = [start_layer(splicer.models[m], splicer.hooks[m]) for m in range(n_models)]
    sums: dict[tuple, float] = dict(known or {})

    def add(key: tuple, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    kept: list[tuple[list[list[Tensor]], list[Tensor | None]]] = []
    means = given_means
    if known is None:  # pass 1: clean CE, the means, the clean activations
        n_tok, pos = splicer.tokens.shape
        keep_all = sum(n_tok * pos * (w + splicer.models[m].cfg.d_model) * 4
                       for m, w in enumerate(splicer.widths)) <= KEEP_BYTES  # fmt: skip
        mean_sums = [torch.zeros(w, dtype=torch.float64) for w in splicer.widths]
        count = 0
        for tokens, keep in splicer.batches("splice: clean"):
            loss: list[float] = []
            got = [capture(splicer, m, tokens, starts[m], loss) for m in range(n_models)]
            for m in range(n_models):
                add((m, "all", "clean"), loss[m])
            if given_means is None:
                count += int(keep.sum())
                for m, (acts, _) in enumerate(got):
                    x = torch.cat(acts, dim=-1)
                    mean_sums[m] += x[keep.to(x.device)].to(torch.float64).sum(0).cpu()
            if keep_all:
                kept.append(([a for a, _ in got], [r for _, r in got]))
        if given_means is None:
            if count == 0:
                raise CrossdiffError("no token positions to splice (every position is skipped)")
            means = [list((s / count).split(splicer.site_widths[m]))
                     for m, s in enumerate(mean_sums)]  # fmt: skip
    kinds = ["spliced"] if known is not None else ["spliced", "zero", "mean"]
    for b, (tokens, keep) in enumerate(splicer.batches("splice: patched")):
        if kept:
            acts, resids = kept[b]
        else:
            got = [capture(splicer, m, tokens, starts[m]) for m in range(n_models)]
            acts, resids = [a for a, _ in got], [r for _, r in got]
        recon = splicer.reconstruct(acts)
        for m in range(n_models):
            hooks = splicer.hooks[m]
            by_kind = {"spliced": recon[m], "zero": [torch.zeros(()) for _ in hooks],
                       "mean": means[m] if means is not None else []}  # fmt: skip
            d_vocab = int(splicer.models[m].cfg.d_vocab)
            per_stack = max(1, STACK_BYTES // max(1, tokens.numel() * d_vocab * 4))
            for scope in scopes(splicer, m, per_site):
                sites = list(range(len(hooks))) if scope == "all" else [scope]
                for lo in range(0, len(kinds), per_stack):
                    group = kinds[lo : lo + per_stack]
                    values = [by_kind[k] for k in group]
                    got_sums = patched_sums(
                        splicer, m, tokens, keep, resids[m], starts[m], sites, values
                    )
                    for kind, value in zip(group, got_sums, strict=True):
                        add((m, scope, kind), value)
    return sums


def cache_key(splicer: Splicer, per_site: bool, given_means: Sequence[Tensor] | None) -> str:
    """What the clean and ablation sums depend on: weights, rows, kept positions, sites, means,
    dtype and device kind."""
    digest = hashlib.sha256()
    parts: dict[str, Any] = {
        "version": CACHE_VERSION,
        "weights": [weights_hash(m) for m in splicer.models],
        "hooks": [list(h) for h in splicer.hooks],
        "per_site": per_site,
        "devices": [splicer.device(m).type for m in range(len(splicer.models))],
        "dtypes": [str(next(m.parameters()).dtype) for m in splicer.models],
        "rows": list(splicer.tokens.shape),
    }
    digest.update(json.dumps(parts, sort_keys=True).encode())
    digest.update(splicer.tokens.contiguous().numpy().tobytes())
    digest.update(splicer.keep.to(torch.uint8).contiguous().numpy().tobytes())
    for mean in given_means or []:
        digest.update(torch.as_tensor(mean).double().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def load_cached(folder: Path | None, key: str) -> dict[tuple, float] | None:
    """The cached clean and ablation sums for `key`, or None (none, or unreadable)."""
    if folder is None:
        return None
    path = folder / f"splice-{key}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        sums = {(int(m), s if s == "all" else int(s), k): float(v) for m, s, k, v in raw["sums"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if raw.get("key") != key or any(k not in ABLATIONS for _, _, k in sums):
        return None
    return sums


def save_cached(folder: Path | None, key: str, sums: dict[tuple, float]) -> None:
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rows = [[m, s, k, v] for (m, s, k), v in sorted(sums.items(), key=str) if k in ABLATIONS]
    write_json_atomic(folder / f"splice-{key}.json", {"key": key, "sums": rows})
