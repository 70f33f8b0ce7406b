"""The store folder a harvest writes: what it may remove or reuse, whether an existing store can be
continued, and opening it for writing (a new store, a resumed one, or a new segment). One process
and several (harvest_ranks.py) share these checks and their messages."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from crossdiff.activations.store import ActivationStore, StoreWriter
from crossdiff.activations.store_layout import (
    MANIFEST,
    RANKS_DIR_RE,
    incompatible_keys,
    is_store_entry,
)
from crossdiff.plumbing.common import CrossdiffError, read_json
from crossdiff.plumbing.stage_marker import RECORD as STAGE_RECORD
from crossdiff.plumbing.stage_marker import mark_written_by


def clear_store(out_dir: Path) -> None:
    """Remove a store (manifest, shards, statistics, rank sub-stores) from `out_dir`."""
    for p in out_dir.iterdir():
        if is_store_entry(p):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def replace_store(out_dir: Path) -> None:
    """resume=False: remove the existing store, and say so."""
    clear_store(out_dir)
    print(f"resume=False: removed the existing store in {out_dir}")


def rank_folders(out_dir: Path) -> list[Path]:
    """The ranks-of-N/ folders of harvests by several processes in `out_dir`."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and RANKS_DIR_RE.match(p.name))


def not_a_store_error(out_dir: Path) -> CrossdiffError:
    return CrossdiffError(
        f"{out_dir} is not empty and holds no activation store; choose an empty or new "
        "folder for the store"
    )


def _foreign(out_dir: Path) -> list[Path]:
    """What `out_dir` holds besides store entries, hidden files and a run's stage record."""
    return [
        p
        for p in out_dir.iterdir()
        if not p.name.startswith(".") and not is_store_entry(p) and p.name != STAGE_RECORD
    ]


def mark_run_stage(out_dir: Path) -> None:
    """A harvest about to change a finished `crossdiff run` store marks its stage record, so the
    run never takes the new content for the store it made (crossdiff.plumbing.stage_marker)."""
    if (out_dir / STAGE_RECORD).exists():
        mark_written_by(out_dir, "crossdiff harvest")


def check_empty(out_dir: Path) -> None:
    """`out_dir` is absent, or holds nothing but store entries, hidden files and a stage record."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CrossdiffError(f"{out_dir} is a file; choose a folder for the store")
    if _foreign(out_dir):
        raise not_a_store_error(out_dir)


def unfinished_harvest_error(
    out_dir: Path, folder: Path, world_size: int | None = None
) -> CrossdiffError:
    """A harvest by N processes left `folder` (ranks-of-N/) in `out_dir`, not merged yet; this
    run (by `world_size` processes, or one when None) must not start another."""
    n = RANKS_DIR_RE.match(folder.name).group(1)  # type: ignore[union-attr]
    this_run = "" if world_size is None else f", and this run has {world_size}"
    return CrossdiffError(
        f"{out_dir} holds an unfinished harvest by {n} processes ({folder.name}/, not merged "
        f"into a store yet){this_run}; resume it with the same number of processes (the same "
        f"command under `torchrun --nproc_per_node {n}`), or delete {folder} (or pass "
        "resume=False / --no-resume) to start over"
    )


def check_compatible(out_dir: Path, manifest: dict[str, Any], header: dict[str, Any]) -> None:
    """The store in `out_dir` was harvested with the same models, hooks and options as `header`."""
    differ = incompatible_keys(manifest, header)
    if differ:
        raise CrossdiffError(
            f"{out_dir} already holds a store harvested with different {differ}; harvest into "
            "a new --out folder, or pass resume=False (--no-resume) to replace it"
        )


def written_message(store: ActivationStore, world_size: int = 1) -> str:
    """What a finished harvest prints."""
    processes = f" by {world_size} processes" if world_size > 1 else ""
    return (
        f"wrote {store.n_tokens} tokens ({store.n_models} models, width {store.d_model}, "
        f"{store.manifest['dtype']}) in {store.n_shards} shards{processes} to {store.path}; "
        f"parts: {store.parts}"
    )


def open_store(
    out_dir: Path, header: dict[str, Any], segment: dict[str, Any], resume: bool
) -> StoreWriter:
    """A writer for the store at `out_dir`: new, resumed (the same token set as its last
    segment) or extended by a new segment (another token set), after checking it may be."""
    check_empty(out_dir)  # before anything is removed: a refusal leaves the folder as it was
    if (out_dir / MANIFEST).exists() and resume:
        check_compatible(out_dir, read_json(out_dir / MANIFEST, "store manifest"), header)
    if not resume:
        mark_run_stage(out_dir)
    if not resume and ((out_dir / MANIFEST).exists() or rank_folders(out_dir)):
        replace_store(out_dir)
    if not (out_dir / MANIFEST).exists():
        unfinished = rank_folders(out_dir)
        if unfinished:
            raise unfinished_harvest_error(out_dir, unfinished[0])
        return StoreWriter.create(out_dir, dict(header, segments=[dict(segment, n_tokens=0)]))
    writer = StoreWriter.reopen(out_dir)
    check_compatible(out_dir, writer.manifest, header)
    segments = writer.manifest["segments"]
    same = [i for i, s in enumerate(segments) if s["token_set"] == segment["token_set"]]
    if same and same[-1] != len(segments) - 1:
        raise CrossdiffError(
            f"the store in {out_dir} already has tokens of this token set (segment {same[-1]}), "
            "and others were appended after it; harvesting it again would duplicate tokens"
        )
    if not same:
        if writer.manifest["domain_names"] != header["domain_names"]:
            raise CrossdiffError(
                f"cannot append: the store has domains {writer.manifest['domain_names']}, this "
                f"token set has {header['domain_names']}"
            )
        writer.manifest["segments"] = [
            *segments,
            dict(segment, start=writer.n_tokens, n_tokens=0),
        ]
    return writer
