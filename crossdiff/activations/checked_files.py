"""Reading a store's files safely: the manifest with its checks, and the shard and statistics
files, each checked against the size and sha256 the manifest records before it is first read.

ActivationStore (store.py) reads through a ShardFiles; StoreWriter (store_writer.py) reopens a store
with read_manifest and read_running_stats.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from safetensors import safe_open

from crossdiff.activations.normalization import RunningStats
from crossdiff.activations.store_layout import FORMAT, FORMAT_VERSION, MANIFEST, check_manifest
from crossdiff.plumbing.common import CrossdiffError, read_json
from crossdiff.plumbing.integrity import sha256_of_file as sha256_file

_MAX_OPEN_SHARDS = 8


def read_manifest(store: Path) -> dict[str, Any]:
    """The manifest of the store folder `store`, checked; an error says what to do."""
    if not (store / MANIFEST).exists():
        raise CrossdiffError(
            f"no activation store at {store} ({MANIFEST} is missing); "
            "create one with `crossdiff harvest` or crossdiff.harvest(...)"
        )
    manifest = read_json(store / MANIFEST, "store manifest")
    if manifest.get("format") != FORMAT:
        raise CrossdiffError(f"{store / MANIFEST} is not a crossdiff activation store")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CrossdiffError(
            f"store {store} has format version {manifest.get('format_version')}, this "
            f"crossdiff reads version {FORMAT_VERSION}; re-harvest it with this version"
        )
    check_manifest(store / MANIFEST, manifest)
    return manifest


def check_store_file(store: Path, path: Path, info: dict[str, Any], what: str) -> None:
    """Refuse `path` unless it exists with the size and sha256 of its manifest entry `info`."""
    advice = (
        f"delete the store folder {store} and harvest again (or restore the file from a "
        "copy); crossdiff never reads a damaged shard"
    )
    name = info.get("file", path.name)  # relative to the store (rank sub-folders included)
    if not path.exists():
        raise CrossdiffError(f"{what} {name} of store {store} is missing; {advice}")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise CrossdiffError(
            f"{what} {name} of store {store} is corrupted: it has {size} bytes, the "
            f"manifest says {info['bytes']}; {advice}"
        )
    if sha256_file(path) != info["sha256"]:
        raise CrossdiffError(
            f"{what} {name} of store {store} is corrupted: its sha256 checksum does "
            f"not match the manifest; {advice}"
        )


def read_running_stats(store: Path, manifest: dict[str, Any]) -> RunningStats:
    """The running statistics the manifest names (empty ones before the first shard)."""
    info = manifest.get("statistics")
    if not info:
        return RunningStats(list(manifest["d_models"]))
    path = store / info["file"]
    check_store_file(store, path, info, "statistics file")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return RunningStats.from_tensors(list(manifest["d_models"]), tensors)


class ShardFiles:
    """The open shards of one store: each checked once (size and sha256) before its first read,
    its shape checked against the manifest, at most _MAX_OPEN_SHARDS memory-mapped at a time.
    `verified` may be shared by several readers of the same store (its parts' views)."""

    def __init__(
        self, store: Path, manifest: dict[str, Any], verified: set[int] | None = None
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.verified: set[int] = set() if verified is None else verified
        self._handles: OrderedDict[int, Any] = OrderedDict()

    def get(self, index: int) -> Any:
        """The safetensors handle of shard `index`."""
        if index in self._handles:
            self._handles.move_to_end(index)
            return self._handles[index]
        info = self.manifest["shards"][index]
        path = self.store / info["file"]
        if index not in self.verified:
            check_store_file(self.store, path, info, "shard")
            self.verified.add(index)
        elif not path.exists() or path.stat().st_size != info["bytes"]:
            check_store_file(self.store, path, info, "shard")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise CrossdiffError(
                f"cannot open shard {path}: {err}; harvest the store again"
            ) from err
        self._check_shape(index, handle)
        self._handles[index] = handle
        if len(self._handles) > _MAX_OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle

    def _check_shape(self, index: int, handle: Any) -> None:
        info = self.manifest["shards"][index]
        expected = [
            info["n_tokens"],
            len(self.manifest["model_names"]),
            int(self.manifest["d_model"]),
        ]
        try:
            shape = list(handle.get_slice("acts").get_shape())
        except Exception as err:  # no "acts" tensor
            raise CrossdiffError(
                f"shard {info['file']} of store {self.store} has no activations ({err}); "
                "harvest the store again"
            ) from err
        if shape != expected:
            raise CrossdiffError(
                f"shard {info['file']} of store {self.store} holds activations of shape {shape} "
                f"but {MANIFEST} says {expected} (n_tokens, n_models, d_model); the manifest was "
                "edited or belongs to another store: restore it or harvest the store again"
            )
