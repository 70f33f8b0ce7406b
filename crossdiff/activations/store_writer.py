"""StoreWriter: appends shards to an activation store (layout in store_layout.py, format in
docs/store.md), keeping the manifest and the running statistics in step.

Writes go shard first, then statistics, then the manifest, each atomically: a crash leaves at most
an orphan file that the next writer removes, never a manifest that names a missing or partial shard.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from crossdiff.activations.checked_files import read_manifest, read_running_stats
from crossdiff.activations.normalization import RunningStats
from crossdiff.activations.store_layout import (
    MANIFEST,
    is_store_file,
    mask_ranges,
    part_counts,
    shard_name,
    stats_name,
)
from crossdiff.plumbing.common import CrossdiffError, DiskFullError, atomic_path, write_json_atomic


def _write_bytes(path: Path, data: bytes) -> None:
    """The one place store files hit the disk (tests replace it to simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _disk_error(
    err: OSError | DiskFullError, what: Path, store: Path, n_tokens: int
) -> CrossdiffError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    else:
        reason = f"the write failed ({err})"
    return CrossdiffError(
        f"could not write {what.name} in {store}: {reason}. The store is intact with "
        f"{n_tokens} tokens (the failed file is not in its manifest). Free some space (or choose "
        "another --out) and re-run the same command to resume where it stopped."
    )


def write_store_file(path: Path, tensors: dict[str, Tensor], store: Path, n_tokens: int) -> dict:
    """Serialize `tensors` to `path` atomically; return its size and sha256."""
    data = save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
    try:
        with atomic_path(path) as tmp:
            _write_bytes(tmp, data)
    except (OSError, DiskFullError) as err:
        raise _disk_error(err, path, store, n_tokens) from err
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class StoreWriter:
    """Appends shards to a store, keeping the manifest and the running statistics in step."""

    def __init__(self, path: Path, manifest: dict[str, Any], stats: RunningStats) -> None:
        self.path = path
        self.manifest = manifest
        self.stats = stats

    @classmethod
    def create(cls, path: Path, manifest: dict[str, Any]) -> StoreWriter:
        manifest = dict(manifest, n_tokens=0, shards=[], statistics=None, scaling_factors=None)
        path.mkdir(parents=True, exist_ok=True)
        writer = cls(path, manifest, RunningStats(manifest["d_models"]))
        writer.remove_orphans()
        write_json_atomic(path / MANIFEST, manifest)
        return writer

    @classmethod
    def reopen(cls, path: Path) -> StoreWriter:
        manifest = read_manifest(path)
        writer = cls(path, manifest, read_running_stats(path, manifest))
        writer.remove_orphans()
        return writer

    def remove_orphans(self) -> list[Path]:
        """Delete shard/stats files the manifest does not name, and temporary files of a crash.

        Only files directly in the store folder: shards a merged manifest names in rank
        sub-folders (`ranks-of-N/rank_R/...`) belong to those sub-stores and are left alone."""
        keep = {s["file"] for s in self.manifest["shards"]}
        if self.manifest.get("statistics"):
            keep.add(self.manifest["statistics"]["file"])
        removed = []
        for child in self.path.iterdir():
            name = child.name
            orphan = is_store_file(name) and name not in keep
            leftover_tmp = name.startswith(
                (".shard_", ".stats_", f".{MANIFEST}")
            ) and name.endswith(".tmp")
            if child.is_file() and (orphan or leftover_tmp):
                child.unlink()
                removed.append(child)
        return removed

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def write_shard(self, tensors: dict[str, Tensor]) -> None:
        """Write one shard. An optional bool `heldout` [n] (not stored as a tensor) marks the
        rows of held-out documents: recorded as ranges, left out of the statistics."""
        tensors = dict(tensors)
        heldout = tensors.pop("heldout", None)
        n = tensors["acts"].shape[0]
        if n == 0:
            raise CrossdiffError("internal error: refusing to write an empty shard")
        index = len(self.manifest["shards"])
        shard_file = self.path / shard_name(index)
        shard_info = write_store_file(shard_file, tensors, self.path, self.n_tokens)
        if self.manifest.get("split") is not None:
            mask = torch.zeros(n, dtype=torch.bool) if heldout is None else heldout.bool()
            shard_info["heldout"] = mask_ranges(mask)
        elif heldout is not None and bool(heldout.any()):
            raise CrossdiffError("internal error: held-out rows for a store without a split")

        stats = RunningStats.from_tensors(self.stats.widths, self.stats.to_tensors())
        stats.update(tensors["acts"] if heldout is None else tensors["acts"][~heldout.bool()])
        stats_file = self.path / stats_name(index + 1)
        stats_info = write_store_file(stats_file, stats.to_tensors(), self.path, self.n_tokens)

        manifest = dict(self.manifest)
        manifest["shards"] = [
            *self.manifest["shards"],
            {"file": shard_file.name, "start": self.n_tokens, "n_tokens": n, **shard_info},
        ]
        manifest["n_tokens"] = self.n_tokens + n
        if manifest.get("split") is not None:
            manifest["parts"] = part_counts(manifest["shards"])
        segments = [dict(s) for s in manifest["segments"]]
        segments[-1]["n_tokens"] += n
        manifest["segments"] = segments
        manifest["statistics"] = {
            "file": stats_file.name,
            **stats_info,
            "per_model": stats.summary(manifest["model_names"]),
        }
        manifest["scaling_factors"] = [float(x) for x in stats.scaling_factors()]
        previous_stats = self.manifest.get("statistics")
        try:
            write_json_atomic(self.path / MANIFEST, manifest)
        except (OSError, DiskFullError) as err:
            raise _disk_error(err, self.path / MANIFEST, self.path, self.n_tokens) from err
        self.manifest, self.stats = manifest, stats
        if previous_stats:
            (self.path / previous_stats["file"]).unlink(missing_ok=True)
