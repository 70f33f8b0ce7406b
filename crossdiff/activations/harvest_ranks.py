"""Harvesting by several processes (torchrun): each rank harvests a contiguous, batch-aligned
range of rows into its own store under OUT/ranks-of-N/rank_R/, then rank 0 writes one manifest for
OUT that lists every rank's shards in rank order (by relative path, nothing copied), with the
ranks' statistics added up. The merged store equals the single-process one token for token.
See docs/store.md for the layout, what resumes and what is refused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from crossdiff.activations.harvest_folder import (
    check_compatible,
    check_empty,
    mark_run_stage,
    open_store,
    rank_folders,
    replace_store,
    unfinished_harvest_error,
    written_message,
)
from crossdiff.activations.harvest_job import HarvestJob, fill
from crossdiff.activations.normalization import RunningStats
from crossdiff.activations.store import ActivationStore, StoreWriter, write_store_file
from crossdiff.activations.store_layout import (
    COMPATIBLE_KEYS,
    MANIFEST,
    PLAN,
    is_store_entry,
    part_counts,
    stats_name,
)
from crossdiff.plumbing.common import CrossdiffError, read_json, write_json_atomic
from crossdiff.plumbing.distributed import all_reduce_sum_, check_same_on_all_ranks, dist_info


def ranks_dir_name(world_size: int) -> str:
    return f"ranks-of-{world_size}"


def rank_dir_name(rank: int) -> str:
    return f"rank_{rank}"


def partition_rows(n_rows: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """Split rows [0, n_rows) into `world_size` contiguous ranges [lo, hi), one per rank in rank
    order, each a whole number of batches of `batch_size` rows (only the last may end short, at
    n_rows); the ranks' batch counts differ by at most one. Ranks beyond the number of batches
    get an empty range (lo == hi)."""
    if n_rows < 0 or batch_size <= 0 or world_size <= 0:
        raise CrossdiffError(
            f"cannot split {n_rows} rows in batches of {batch_size} over {world_size} processes"
        )
    n_batches = -(-n_rows // batch_size)
    bounds = [min(r * n_batches // world_size * batch_size, n_rows) for r in range(world_size + 1)]
    return [(bounds[r], bounds[r + 1]) for r in range(world_size)]


def _plan(job: HarvestJob, world_size: int) -> dict[str, Any]:
    """Which rows and tokens each rank harvests (a JSON object, saved as ranks-of-N/plan.json)."""
    cumulative, target = job.cumulative, job.target
    end_row = int(torch.searchsorted(cumulative, target - 1, right=True)) + 1

    def tokens_before(row: int) -> int:
        return min(int(cumulative[row - 1]), target) if row > 0 else 0

    ranks = [
        {"rank": r, "rows": [lo, hi], "tokens": [tokens_before(lo), tokens_before(hi)]}
        for r, (lo, hi) in enumerate(partition_rows(end_row, job.batch_size, world_size))
    ]
    setup = {k: job.header[k] for k in COMPATIBLE_KEYS}
    return {
        "world_size": world_size,
        "token_set": job.segment["token_set"],
        "n_seq": job.segment["n_seq"],
        "seq_len": job.segment["seq_len"],
        "n_tokens": target,
        "batch_size": job.batch_size,
        "setup": json.loads(json.dumps(setup)),
        "ranks": ranks,
    }


_T = TypeVar("_T")


def together(step: Callable[[], _T], what: str) -> _T:
    """Run `step` on every rank, then fail on every rank if it failed on any (no rank is left
    waiting for one that gave up). Doubles as a barrier."""
    info = dist_info()
    error: Exception | None = None
    result = None
    try:
        result = step()
    except Exception as err:  # re-raised below, after the other ranks have heard of it
        error = err
    failed = torch.zeros(info.world_size, dtype=torch.long)
    if error is not None:
        failed[info.rank] = 1
    all_reduce_sum_(failed)
    if error is not None:
        raise error
    bad = failed.nonzero().flatten().tolist()
    if bad:
        raise CrossdiffError(
            f"rank {', '.join(map(str, bad))} failed while {what} (see that rank's own error "
            "message); fix the cause and re-run the same command with the same number of "
            "processes to resume"
        )
    return result  # type: ignore[return-value]


def _check_folder(
    job: HarvestJob, out_dir: Path, ranks_dir: Path, plan: dict[str, Any], resume: bool
) -> int:
    """Read-only, on every rank: the tokens a finished store at `out_dir` already holds (0 when
    there is none), or an error when the folder holds something this run must not touch."""
    if not resume or not out_dir.exists():
        check_empty(out_dir)
        return 0
    if (out_dir / MANIFEST).exists():
        manifest = ActivationStore(out_dir).manifest
        check_compatible(out_dir, manifest, job.header)
        last = manifest["segments"][-1] if manifest["segments"] else {}
        if last.get("token_set") == job.segment["token_set"] and last["n_tokens"] >= job.target:
            return int(last["n_tokens"])
        raise CrossdiffError(
            f"{out_dir} already holds a store of {manifest['n_tokens']} tokens, without the "
            f"{job.target} asked for of this token set; a harvest by several processes writes a "
            "new store (or finishes its own interrupted one), it does not extend or append to "
            "one. Extend it with a single-process harvest (the same command without torchrun), "
            "harvest into a new --out folder, or pass resume=False (--no-resume) to replace it"
        )
    others = [p for p in rank_folders(out_dir) if p != ranks_dir]
    if others:
        raise unfinished_harvest_error(out_dir, others[0], plan["world_size"])
    check_empty(out_dir)
    if (ranks_dir / PLAN).exists():
        old = read_json(ranks_dir / PLAN, "harvest plan")
        if old != plan:
            setup = [k for k in COMPATIBLE_KEYS if old.get("setup", {}).get(k) != plan["setup"][k]]
            options = [k for k in ("token_set", "n_tokens", "batch_size") if old.get(k) != plan[k]]
            differ = setup or options or ["plan"]
            raise CrossdiffError(
                f"{ranks_dir} holds an unfinished harvest with different {differ} (it was "
                f"started with n_tokens={old.get('n_tokens')}, batch_size="
                f"{old.get('batch_size')}); re-run it with the same options to finish it, or "
                f"delete {ranks_dir} (or pass --no-resume) to start over"
            )
    return 0


def _start_folder(out_dir: Path, ranks_dir: Path, plan: dict[str, Any], resume: bool) -> None:
    """Rank 0: clear the old store when not resuming, and record the plan."""
    if not resume and out_dir.is_dir() and any(is_store_entry(p) for p in out_dir.iterdir()):
        mark_run_stage(out_dir)
        replace_store(out_dir)
    if not (ranks_dir / PLAN).exists():
        write_json_atomic(ranks_dir / PLAN, plan)


def _harvest_rank(
    job: HarvestJob, ranks_dir: Path, plan: dict[str, Any], rank: int, progress: bool
) -> None:
    """Harvest this rank's part of the plan into its own (resumable) store."""
    if not (ranks_dir / PLAN).exists():  # rank 0 has just written it, before the last barrier
        raise CrossdiffError(
            f"rank {rank} does not see {ranks_dir / PLAN}, which rank 0 has written; every "
            "process must be given the same store folder, on a disk they all share"
        )
    part = plan["ranks"][rank]
    lo, hi = part["tokens"]
    if hi <= lo:
        return  # more processes than batches: nothing for this one
    rank_dir = ranks_dir / rank_dir_name(rank)
    segment = dict(job.segment, rows=part["rows"], tokens=part["tokens"])
    writer = open_store(rank_dir, job.header, segment, resume=True)
    segments = writer.manifest["segments"]
    if len(segments) != 1 or segments[0].get("tokens") != part["tokens"]:
        raise CrossdiffError(
            f"{rank_dir} holds other tokens than rank {rank}'s part of the harvest "
            f"(tokens {lo}..{hi - 1}); delete {ranks_dir} and harvest again"
        )
    done = int(segments[0]["n_tokens"])
    if done >= hi - lo:
        return
    with tqdm(
        total=hi - lo,
        initial=done,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {job.pairing.name} [rank {rank}/{plan['world_size']}]",
        position=rank,
        disable=not progress,
    ) as bar:
        fill(job, writer, lo + done, hi, bar)


def _merge(job: HarvestJob, out_dir: Path, ranks_dir: Path, plan: dict[str, Any]) -> None:
    """Rank 0: one manifest over every rank's shards, in rank order, with merged statistics,
    written once, atomically. The shards stay where the ranks wrote them."""
    shards: list[dict[str, Any]] = []
    n_total = 0
    stats = RunningStats(job.widths)
    for part in plan["ranks"]:
        lo, hi = part["tokens"]
        if hi <= lo:
            continue
        rank_dir = ranks_dir / rank_dir_name(part["rank"])
        sub = ActivationStore(rank_dir)
        if sub.n_tokens != hi - lo:
            raise CrossdiffError(
                f"{rank_dir} holds {sub.n_tokens} tokens, but rank {part['rank']}'s part is "
                f"{hi - lo}; re-run the same command to finish it"
            )
        for shard in sub.manifest["shards"]:
            file = f"{ranks_dir.name}/{rank_dir.name}/{shard['file']}"
            if not (out_dir / file).is_file() or (out_dir / file).stat().st_size != shard["bytes"]:
                raise CrossdiffError(
                    f"shard {file} of {out_dir} is missing or damaged; delete {ranks_dir} and "
                    "harvest again"
                )
            shards.append(dict(shard, file=file, start=n_total))
            n_total += int(shard["n_tokens"])
        stats.add(sub.running_stats())
    if n_total != job.target:
        raise CrossdiffError(
            f"internal error: the ranks hold {n_total} tokens, {job.target} were asked for"
        )
    # an earlier merge that died before its manifest may have left a statistics file behind
    StoreWriter(out_dir, {"shards": [], "statistics": None}, stats).remove_orphans()
    stats_file = out_dir / stats_name(len(shards))
    stats_info = write_store_file(stats_file, stats.to_tensors(), out_dir, 0)
    manifest = dict(
        job.header,
        segments=[dict(job.segment, n_tokens=n_total)],
        n_tokens=n_total,
        shards=shards,
        **({"parts": part_counts(shards)} if job.header.get("split") is not None else {}),
        statistics={
            "file": stats_file.name,
            **stats_info,
            "per_model": stats.summary(job.header["model_names"]),
        },
        scaling_factors=[float(x) for x in stats.scaling_factors()],
        distributed={
            "world_size": plan["world_size"],
            "folder": ranks_dir.name,
            "ranks": plan["ranks"],
        },
    )
    try:
        write_json_atomic(out_dir / MANIFEST, manifest)
    except OSError as err:
        raise CrossdiffError(
            f"could not write the merged manifest of {out_dir} ({err}); the ranks' stores are "
            "intact: free some space and re-run the same command to merge them"
        ) from err


def harvest_ranks(job: HarvestJob, out_dir: Path, resume: bool, progress: bool) -> ActivationStore:
    info = dist_info()
    plan = _plan(job, info.world_size)
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    check_same_on_all_ranks(
        int(digest[:15], 16), "the harvest (models, pairing, token set, n_tokens or batch_size)"
    )
    ranks_dir = out_dir / ranks_dir_name(info.world_size)
    done = together(
        lambda: _check_folder(job, out_dir, ranks_dir, plan, resume), f"checking {out_dir}"
    )
    if done:
        job.say(f"{out_dir} already holds {done} tokens of this token set; nothing to harvest")
        return ActivationStore(out_dir)
    together(
        lambda: _start_folder(out_dir, ranks_dir, plan, resume) if info.is_main else None,
        f"preparing {out_dir}",
    )
    together(lambda: _harvest_rank(job, ranks_dir, plan, info.rank, progress), "harvesting")
    together(lambda: _merge(job, out_dir, ranks_dir, plan) if info.is_main else None, "merging")
    store = ActivationStore(out_dir)
    job.say(written_message(store, info.world_size))
    return store
