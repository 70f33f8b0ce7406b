"""A harvest job: the checked inputs of a harvest (its options, token rows, the pair's runner, the
store's header and sizes), and filling a store with a range of its tokens in fixed model batches.
One process (harvest.py), several (harvest_ranks.py) and the live source (live.py) run the same
job."""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossdiff.activations.bridge import model_source
from crossdiff.activations.identity import (
    LensModel,
    check_tokenizers,
    config_hash,
    tokenizer_info,
    weights_hash,
)
from crossdiff.activations.pairing import Pairing, load_pairing
from crossdiff.activations.rows import TokenRows, as_token_rows, heldout_documents
from crossdiff.activations.runner import (
    PairRunner,
    check_hooks,
    expert_layout,
    expert_slot,
    probe_widths,
    resolve_model_dtype,
)
from crossdiff.activations.store import StoreWriter
from crossdiff.activations.store_layout import FORMAT, FORMAT_VERSION
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError, dtype_name, resolve_device, resolve_dtype

SHARD_BYTES = 64 * 2**20  # default shard size: tokens of this many bytes of activations


@dataclass(frozen=True)
class HarvestOptions:
    """How to harvest (every keyword of `harvest` that shapes the store; see its docstring)."""

    n_tokens: int | None = None
    batch_size: int = 32
    dtype: str | torch.dtype = "float16"
    shard_tokens: int | None = None
    model_names: tuple[str, str] = ("A", "B")
    device: str | torch.device | None = None
    tokenizer: Any = None
    tokenizer_fingerprints: tuple[str | None, str | None] | None = None
    heldout_fraction: float = 0.1
    split_seed: int = 0
    model_dtype: str | torch.dtype | None = None


@dataclass
class HarvestJob:
    """A checked harvest: the token rows, the models' runner, the store's header and sizes."""

    rows: TokenRows
    runner: PairRunner
    pairing: Pairing
    widths: list[int]
    d_store: int
    store_dtype: torch.dtype
    header: dict[str, Any]
    segment: dict[str, Any]
    cumulative: Tensor  # [n_seq] tokens kept in rows 0..i
    target: int  # tokens of the token set to harvest
    batch_size: int
    shard_tokens: int
    verbose: bool
    heldout_docs: Tensor  # sorted doc ids of the held-out part

    def say(self, message: str) -> None:
        if self.verbose:
            print(message)


def prepare_job(
    model_a: LensModel,
    model_b: LensModel,
    token_set: TokenSet | Tensor,
    pairing: Pairing | str | Path,
    options: HarvestOptions,
    *,
    verbose: bool,
) -> HarvestJob:
    """Check the inputs, place the models, probe the widths and build the store's header."""
    o = options
    model_names, batch_size, device = o.model_names, o.batch_size, o.device
    heldout_fraction, split_seed = o.heldout_fraction, o.split_seed
    pairing = load_pairing(pairing)
    models = (model_a, model_b)
    names = (str(model_names[0]), str(model_names[1]))
    if len(model_names) != 2 or names[0] == names[1]:
        raise CrossdiffError(f"model_names must be two different names, got {model_names}")
    if batch_size <= 0:
        raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
    store_dtype = resolve_dtype(o.dtype)
    rows = as_token_rows(token_set, pairing.drop_bos)
    heldout_docs = heldout_documents(rows.doc_ids, rows.keep, heldout_fraction, split_seed)
    check_tokenizers(
        models,
        names,
        o.tokenizer_fingerprints,
        rows.tokens,
        getattr(token_set, "tokenizer_fingerprint", None),
    )
    for model, name, hooks in zip(models, names, (pairing.hooks_a, pairing.hooks_b), strict=True):
        check_hooks(model, name, hooks)
        if device is not None and next(model.parameters()).device != resolve_device(device):
            model.to(resolve_device(device))
    slot = expert_slot(pairing, models)
    if pairing.expert_indices and slot is None and verbose:
        print(
            f"note: neither model has {list(pairing.expert_indices)}; experts are stored as -1",
        )
    runner = PairRunner(models, names, pairing, slot)
    runner.model_dtype = resolve_model_dtype(o.model_dtype, models)

    kept_per_row = rows.keep.sum(dim=1)
    cumulative = kept_per_row.cumsum(0)
    available = int(cumulative[-1])
    target = available if o.n_tokens is None else int(o.n_tokens)
    if target <= 0 or target > available:
        raise CrossdiffError(
            f"n_tokens={o.n_tokens} but the token set has {available} tokens to harvest "
            f"({len(rows.tokens)} rows, BOS dropped={pairing.drop_bos}); ask for at most "
            f"{available} or give a bigger token set"
        )

    with torch.no_grad():
        widths, expert_width = probe_widths(runner, rows.tokens)
    d_store = max(widths)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_names": list(names),
        "models": [
            {
                "name": n,
                "config_hash": config_hash(m),
                "weights_hash": weights_hash(m),
                "d_model": int(m.cfg.d_model),
            }
            for n, m in zip(names, models, strict=True)
        ],
        "hook_points": {names[0]: list(pairing.hooks_a), names[1]: list(pairing.hooks_b)},
        "pairing": pairing.to_dict(),
        "dtype": dtype_name(store_dtype),
        "model_dtype": dtype_name(runner.model_dtype),
        "d_model": d_store,
        "d_models": widths,
        "experts": {
            "model": None if slot is None else names[slot],
            "hooks": list(runner.expert_hooks),
            "width": max(expert_width, 1),
            "layout": expert_layout(runner, models),
            # a Bridge's experts read as the top-k of its router's output (activations/bridge.py)
            **(
                {"router_hooks": {h: r[0] for h, r in runner.routers.items()}}
                if runner.routers
                else {}
            ),
        },
        "model_sources": [model_source(m) for m in models],
        "tokenizer": tokenizer_info(
            o.tokenizer,
            models,
            o.tokenizer_fingerprints,
            getattr(token_set, "tokenizer_fingerprint", None),
        ),
        "domain_names": list(rows.domain_names),
        "split": {
            "unit": "document",
            "heldout_fraction": float(heldout_fraction),
            "seed": int(split_seed),
        },
    }
    doc_list = json.dumps(heldout_docs.tolist())
    segment = {
        "token_set": rows.fingerprint,
        "n_seq": int(rows.tokens.shape[0]),
        "seq_len": int(rows.tokens.shape[1]),
        "start": 0,
        "documents": int(torch.unique(rows.doc_ids[rows.keep]).numel()),
        "heldout_documents": int(heldout_docs.numel()),
        "heldout_documents_sha256": hashlib.sha256(doc_list.encode()).hexdigest()[:32],
    }
    shard_tokens = o.shard_tokens
    if shard_tokens is None:
        shard_tokens = max(1024, SHARD_BYTES // (2 * d_store * store_dtype.itemsize))
    return HarvestJob(
        rows=rows, runner=runner, pairing=pairing, widths=widths, d_store=d_store,
        store_dtype=store_dtype, header=header, segment=segment, cumulative=cumulative,
        target=target, batch_size=batch_size, shard_tokens=int(shard_tokens), verbose=verbose,
        heldout_docs=heldout_docs,
    )  # fmt: skip


def fill(job: HarvestJob, writer: StoreWriter, done: int, target: int, bar: Any) -> None:
    """Harvest tokens [done, target) of the token set (kept tokens, row by row) into `writer`.

    Rows always go through the models in the same fixed batches (rows b*batch_size up to
    (b+1)*batch_size), whichever part of the token set is harvested: an interrupted, extended or
    rank-split harvest computes exactly the batches of one uninterrupted run.
    """
    rows, cumulative, batch_size = job.rows, job.cumulative, job.batch_size
    shard_tokens = job.shard_tokens
    first_row = int(torch.searchsorted(cumulative, done, right=True))
    start_row = first_row // batch_size * batch_size  # batches stay aligned across resumes
    skip = done - (int(cumulative[start_row - 1]) if start_row > 0 else 0)
    end_row = int(torch.searchsorted(cumulative, target - 1, right=True)) + 1
    remaining = target - done

    buffer: list[dict[str, Tensor]] = []
    n_buffered = 0

    def flush(final: bool) -> None:
        nonlocal buffer, n_buffered
        if not buffer:
            return
        merged = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}
        lo = 0
        while n_buffered - lo >= shard_tokens or (final and n_buffered > lo):
            hi = min(lo + shard_tokens, n_buffered)
            writer.write_shard({k: v[lo:hi] for k, v in merged.items()})
            lo = hi
        buffer = [{k: v[lo:] for k, v in merged.items()}] if lo < n_buffered else []
        n_buffered -= lo

    with torch.no_grad(), ExitStack() as stack:
        job.runner.install(stack)
        for row in range(start_row, end_row, batch_size):
            stop = min(row + batch_size, len(rows.tokens))  # fixed batches: same rounding
            acts, experts = job.runner.run(rows.tokens[row:stop], row)
            chunk = _select(
                rows, row, stop, acts, experts, job.widths, job.d_store, job.store_dtype
            )
            chunk["heldout"] = torch.isin(chunk["doc_ids"], job.heldout_docs)
            n = chunk["acts"].shape[0]
            lo, hi = min(skip, n), min(n, skip + remaining)
            skip -= lo
            if hi > lo:
                buffer.append({k: v[lo:hi] for k, v in chunk.items()})
                n_buffered += hi - lo
                remaining -= hi - lo
                bar.update(hi - lo)
            if n_buffered >= shard_tokens:
                flush(final=False)
        flush(final=True)
    if remaining != 0:
        raise CrossdiffError(f"internal error: harvest ended {remaining} tokens short")


def _select(
    rows: TokenRows,
    start: int,
    stop: int,
    acts: list[Tensor],
    experts: Tensor | None,
    widths: list[int],
    d_store: int,
    store_dtype: torch.dtype,
) -> dict[str, Tensor]:
    keep = rows.keep[start:stop].reshape(-1)
    index = keep.nonzero().squeeze(1)
    n = index.shape[0]
    out = torch.zeros(n, len(acts), d_store, dtype=store_dtype)
    for m, x in enumerate(acts):
        if x.shape[-1] != widths[m]:
            raise CrossdiffError(
                f"model {m} activations changed width from {widths[m]} to {x.shape[-1]}"
            )
        out[:, m, : widths[m]] = x.reshape(-1, widths[m]).cpu()[index].to(store_dtype)
    seq_len = rows.tokens.shape[1]
    if experts is None:
        expert_ids = torch.full((n, 1), -1, dtype=torch.int16)
    else:
        expert_ids = experts.reshape(-1, experts.shape[-1]).cpu()[index].to(torch.int16)
    domains = rows.domains[start:stop].unsqueeze(1).expand(-1, seq_len).reshape(-1)
    return {
        "acts": out,
        "token_ids": rows.tokens[start:stop].reshape(-1)[index].to(torch.int32),
        "doc_ids": rows.doc_ids[start:stop].reshape(-1)[index].to(torch.int64),
        "positions": rows.positions[start:stop].reshape(-1)[index].to(torch.int32),
        "domains": domains[index].to(torch.int16),
        "experts": expert_ids,
    }
