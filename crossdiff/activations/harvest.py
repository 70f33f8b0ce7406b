"""Paired harvesting: run two models on identical token batches and stream their activations
at the pairing's hook points into an ActivationStore.

`harvest` checks its arguments into a HarvestJob (harvest_job.py) and runs it alone (here) or by
several processes (harvest_ranks.py). The parts: rows.py (the token rows and the document split),
identity.py (the models' hashes and tokenizers), runner.py (running the pair), store_layout.py and
harvest_folder.py (the store's files and what a harvest may do to a folder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from crossdiff.activations.harvest_folder import mark_run_stage, open_store, written_message
from crossdiff.activations.harvest_job import (
    SHARD_BYTES,
    HarvestJob,
    HarvestOptions,
    fill,
    prepare_job,
)
from crossdiff.activations.identity import LensModel, config_hash, weights_hash
from crossdiff.activations.pairing import Pairing
from crossdiff.activations.rows import heldout_documents, tokens_with_domains
from crossdiff.activations.runner import eval_mode
from crossdiff.activations.store import ActivationStore
from crossdiff.activations.store_layout import PLAN, RANKS_DIR_RE
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import dist_info
from crossdiff.plumbing.lock import folder_lock

__all__ = [  # the names harvest.py held before its parts had modules of their own
    "PLAN",
    "RANKS_DIR_RE",
    "SHARD_BYTES",
    "HarvestOptions",
    "LensModel",
    "config_hash",
    "harvest",
    "heldout_documents",
    "tokens_with_domains",
    "weights_hash",
]


def harvest(
    model_a: LensModel,
    model_b: LensModel,
    token_set: TokenSet | Tensor,
    pairing: Pairing | str | Path,
    out_dir: str | Path,
    *,
    n_tokens: int | None = None,
    batch_size: int = 32,
    dtype: str | torch.dtype = "float16",
    shard_tokens: int | None = None,
    model_names: tuple[str, str] = ("A", "B"),
    device: str | torch.device | None = None,
    resume: bool = True,
    tokenizer: Any = None,
    tokenizer_fingerprints: tuple[str | None, str | None] | None = None,
    progress: bool = True,
    distributed: bool | None = None,
    heldout_fraction: float = 0.1,
    split_seed: int = 0,
    domains: Tensor | Sequence[int] | None = None,
    domain_names: Sequence[str] | None = None,
    model_dtype: str | torch.dtype | None = None,
) -> ActivationStore:
    """Record both models' activations at the pairing's hook points into a store at `out_dir`.

    `model_a` and `model_b` are TransformerLens models: `HookedTransformer`s or
    `TransformerBridge`s (a Bridge's hook aliases such as `blocks.1.hook_resid_post` work). Each
    runs up to the deepest block the pairing reads. `token_set` is a crossdiff TokenSet or a
    plain integer tensor [n_seq, seq_len], whose rows are then its documents; give such a tensor
    one domain per row with `domains` (and `domain_names`), or none (the store then records no
    domains). `model_names` name the two models in the store, the report and every message.

    The tokens of `heldout_fraction` of the token set's documents (chosen by `split_seed`, see
    heldout_documents) form the store's held-out part, which crosscoder training never reads
    and evaluation does; a document is never in both parts. The statistics and scaling factors
    are those of the training part.

    Tokens are taken row by row from `token_set` (BOS positions dropped unless the pairing says
    otherwise) until `n_tokens` are stored (default: all). `batch_size` is in rows. Re-running
    with the same arguments continues an interrupted harvest; a larger `n_tokens` extends it; a
    different token set is appended as a new segment. The models run in eval mode, each on its
    own device (or both moved to `device` if given). `model_dtype` is the precision their
    forward passes run in (torch.autocast; the weights stay as they are): default bfloat16 on
    CUDA and float32 on the CPU; "float32" turns autocast off.

    Under torchrun (`distributed=None` detects a process group of more than one process; True
    requires one, False harvests as if alone) every process must make the same call: each
    harvests its own contiguous part of the rows into `out_dir/ranks-of-N/rank_R/`, then rank 0
    merges them into one store at `out_dir`, equal token for token to a single-process harvest
    (see docs/store.md). Such a run writes a new store or finishes its own interrupted one; it
    does not extend or append to an existing store.
    """
    if domains is not None:
        if not isinstance(token_set, Tensor):
            raise CrossdiffError(
                "domains= is for a plain token tensor; a TokenSet carries its own "
                "(TokenSet.domains and domain_names)"
            )
        token_set = tokens_with_domains(token_set, domains, domain_names)
    elif domain_names is not None:
        raise CrossdiffError("domain_names= needs domains= (one domain index per token row)")
    info = dist_info()
    if distributed is None:
        distributed = info.enabled
    if distributed and not info.enabled:
        raise CrossdiffError(
            "distributed=True but no torch.distributed process group of more than one process "
            "is running; launch with `torchrun --nproc_per_node N` and call "
            "crossdiff.plumbing.distributed.init_distributed() first (the CLI does), or leave "
            "distributed=None"
        )
    options = HarvestOptions(
        n_tokens=n_tokens, batch_size=batch_size, dtype=dtype, shard_tokens=shard_tokens,
        model_names=model_names, device=device, tokenizer=tokenizer,
        tokenizer_fingerprints=tokenizer_fingerprints, heldout_fraction=heldout_fraction,
        split_seed=split_seed, model_dtype=model_dtype,
    )  # fmt: skip
    out_dir = Path(out_dir)
    lock = out_dir / ".harvest.lock"  # one harvest per store; under torchrun, rank 0's
    locked = folder_lock(lock, f"store {out_dir}", enabled=info.is_main or not distributed)
    with locked, eval_mode((model_a, model_b)):
        if distributed:
            from crossdiff.activations.harvest_ranks import harvest_ranks, together

            job = together(
                lambda: prepare_job(
                    model_a, model_b, token_set, pairing, options, verbose=info.is_main
                ),
                "checking its inputs",
            )
            return harvest_ranks(job, out_dir, resume, progress)
        job = prepare_job(model_a, model_b, token_set, pairing, options, verbose=True)
        return _harvest_alone(job, out_dir, resume, progress)


def _harvest_alone(job: HarvestJob, out_dir: Path, resume: bool, progress: bool) -> ActivationStore:
    """One process: open (or resume, or extend) the store and harvest what it lacks."""
    writer = open_store(out_dir, job.header, job.segment, resume)
    done = int(writer.manifest["segments"][-1]["n_tokens"])
    if done >= job.target:
        print(f"{out_dir} already holds {done} tokens of this token set; nothing to harvest")
        return ActivationStore(out_dir)
    mark_run_stage(out_dir)  # extending a run's finished store in place
    with tqdm(
        total=job.target,
        initial=done,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {job.pairing.name}",
        disable=not progress,
    ) as bar:
        fill(job, writer, done, job.target, bar)
    store = ActivationStore(out_dir)
    print(written_message(store))
    return store
