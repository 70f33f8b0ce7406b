"""ActivationStore: paired activations on disk, sharded safetensors plus a JSON manifest.

Layout (format in docs/store.md):
    manifest.json               models, hooks, pairing, dtype, shards with token counts and sha256
    shard_NNNNN.safetensors     acts [n, n_models, d] and token_ids, doc_ids, positions, domains,
                                experts [n, width] per token
    stats_NNNNN.safetensors     float64 running sums after NNNNN shards (norms, mean/std per dim)
    ranks-of-N/rank_R/          a harvest by N processes: each rank's own store (same layout); the
                                top-level manifest names their shards by relative path

A shard's `file` in the manifest is a path relative to the store folder.

Writes go shard first, then statistics, then the manifest, each atomically: a crash leaves at most
an orphan file that the next writer removes, never a manifest that names a missing or partial shard.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from crossdiff.activations.normalization import RunningStats
from crossdiff.activations.pairing import hook_layer
from crossdiff.common import (
    CrossdiffError,
    DiskFullError,
    atomic_path,
    read_json,
    resolve_dtype,
    write_json_atomic,
)

FORMAT = "crossdiff.ActivationStore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEYS = ("token_ids", "doc_ids", "positions", "domains", "experts")
_STORE_FILE_RE = re.compile(r"^(shard|stats)_\d{5}\.safetensors$")
_MAX_OPEN_SHARDS = 8


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def stats_name(n_shards: int) -> str:
    return f"stats_{n_shards:05d}.safetensors"


def expert_column_map(
    hooks: list[str] | tuple[str, ...], top_k: list[int], n_experts: int | None
) -> list[dict[str, Any]]:
    """The manifest's `experts.layout`: per expert hook (in the order its columns were written),
    its block index, how many experts it routes among and its columns [start, stop) of the
    per-token `experts` row."""
    if len(hooks) != len(top_k):
        raise CrossdiffError(f"{len(hooks)} expert hooks but {len(top_k)} column counts")
    layout, start = [], 0
    for hook, k in zip(hooks, top_k, strict=True):
        layer = hook_layer(hook)
        layout.append(
            {
                "hook": hook,
                "layer": layer,
                "n_experts": None if n_experts is None else int(n_experts),
                "columns": [start, start + int(k)],
            }
        )
        start += int(k)
    return layout


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
        store = ActivationStore(path)
        writer = cls(path, store.manifest, store.running_stats())
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
            orphan = _STORE_FILE_RE.match(name) and name not in keep
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
        n = tensors["acts"].shape[0]
        if n == 0:
            raise CrossdiffError("internal error: refusing to write an empty shard")
        index = len(self.manifest["shards"])
        shard_file = self.path / shard_name(index)
        shard_info = write_store_file(shard_file, tensors, self.path, self.n_tokens)

        stats = RunningStats.from_tensors(self.stats.widths, self.stats.to_tensors())
        stats.update(tensors["acts"])
        stats_file = self.path / stats_name(index + 1)
        stats_info = write_store_file(stats_file, stats.to_tensors(), self.path, self.n_tokens)

        manifest = dict(self.manifest)
        manifest["shards"] = [
            *self.manifest["shards"],
            {"file": shard_file.name, "start": self.n_tokens, "n_tokens": n, **shard_info},
        ]
        manifest["n_tokens"] = self.n_tokens + n
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


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The counts and widths in a manifest agree with each other (an edited manifest does not)."""
    advice = "the manifest was edited or damaged: restore it or harvest the store again"
    try:
        shards = manifest["shards"]
        n_tokens = int(manifest["n_tokens"])
        d_models = [int(d) for d in manifest["d_models"]]
        d_model = int(manifest["d_model"])
        n_models = len(manifest["model_names"])
        counts = [int(s["n_tokens"]) for s in shards]
        starts = [int(s["start"]) for s in shards]
    except (KeyError, TypeError, ValueError) as err:
        raise CrossdiffError(f"{path} lacks or mangles a field ({err!r}); {advice}") from err
    if sum(counts) != n_tokens:
        raise CrossdiffError(
            f"{path} says n_tokens={n_tokens} but its shards hold {sum(counts)} tokens; {advice}"
        )
    expected_starts = [sum(counts[:i]) for i in range(len(counts))]
    if starts != expected_starts:
        raise CrossdiffError(
            f"{path} gives shard starts {starts} but the shard sizes make them "
            f"{expected_starts}; {advice}"
        )
    if len(d_models) != n_models or (d_models and d_model != max(d_models)):
        raise CrossdiffError(
            f"{path} says d_model={d_model} with d_models={d_models} for {n_models} models; "
            f"d_model must be the largest of d_models, one per model; {advice}"
        )


class ActivationStore:
    """A store folder, read lazily: shards are memory-mapped; only requested rows are read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).exists():
            raise CrossdiffError(
                f"no activation store at {self.path} ({MANIFEST} is missing); "
                "create one with `crossdiff harvest` or crossdiff.harvest(...)"
            )
        manifest = read_json(self.path / MANIFEST, "store manifest")
        if manifest.get("format") != FORMAT:
            raise CrossdiffError(f"{self.path / MANIFEST} is not a crossdiff activation store")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CrossdiffError(
                f"store {self.path} has format version {manifest.get('format_version')}, this "
                f"crossdiff reads version {FORMAT_VERSION}; re-harvest it with this version"
            )
        _check_manifest(self.path / MANIFEST, manifest)
        self.manifest: dict[str, Any] = manifest
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._verified: set[int] = set()
        starts = [s["start"] for s in manifest["shards"]]
        self._starts = torch.tensor([*starts, manifest["n_tokens"]], dtype=torch.long)

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, n_tokens={self.n_tokens}, "
            f"models={self.model_names}, d_models={self.d_models}, dtype={self.manifest['dtype']})"
        )

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_models(self) -> int:
        return len(self.manifest["model_names"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def d_models(self) -> list[int]:
        return list(self.manifest["d_models"])

    @property
    def model_names(self) -> list[str]:
        return list(self.manifest["model_names"])

    @property
    def domain_names(self) -> list[str]:
        return list(self.manifest["domain_names"])

    @property
    def hook_points(self) -> dict[str, list[str]]:
        return {name: list(hooks) for name, hooks in self.manifest["hook_points"].items()}

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.manifest["dtype"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def scaling_factors(self) -> Float[Tensor, " n_models"]:
        """Multiply model m's raw activations by factor m to bring their mean norm to sqrt(d_m)."""
        factors = self.manifest.get("scaling_factors")
        if factors is None:
            return torch.ones(self.n_models)
        return torch.tensor(factors, dtype=torch.float32)

    def running_stats(self) -> RunningStats:
        info = self.manifest.get("statistics")
        if not info:
            return RunningStats(self.d_models)
        path = self.path / info["file"]
        self._check_file(path, info, "statistics file")
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return RunningStats.from_tensors(self.d_models, tensors)

    def statistics(self) -> dict[str, Tensor]:
        """mean and std per dimension [n_models, d] (zero on padded dims), mean_norm [n_models]."""
        stats = self.running_stats()
        mean = torch.zeros(self.n_models, self.d_model, dtype=torch.float64)
        std = torch.zeros_like(mean)
        for m, width in enumerate(self.d_models):
            mean[m, :width] = stats.mean(m)
            std[m, :width] = stats.std(m)
        return {
            "mean": mean,
            "std": std,
            "mean_norm": stats.mean_norms(),
            "scaling_factors": self.scaling_factors,
        }

    # --- reading -----------------------------------------------------------------------------

    def _check_file(self, path: Path, info: dict[str, Any], what: str) -> None:
        advice = (
            f"delete the store folder {self.path} and harvest again (or restore the file from a "
            "copy); crossdiff never reads a damaged shard"
        )
        name = info.get("file", path.name)  # relative to the store (rank sub-folders included)
        if not path.exists():
            raise CrossdiffError(f"{what} {name} of store {self.path} is missing; {advice}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CrossdiffError(
                f"{what} {name} of store {self.path} is corrupted: it has {size} bytes, the "
                f"manifest says {info['bytes']}; {advice}"
            )
        if sha256_file(path) != info["sha256"]:
            raise CrossdiffError(
                f"{what} {name} of store {self.path} is corrupted: its sha256 checksum does "
                f"not match the manifest; {advice}"
            )

    def verify(self) -> None:
        """Check the size and checksum of every shard (reading also checks each once, lazily)."""
        for i in range(self.n_shards):
            self._shard(i)

    def _shard(self, index: int) -> Any:
        if index in self._handles:
            self._handles.move_to_end(index)
            return self._handles[index]
        info = self.manifest["shards"][index]
        path = self.path / info["file"]
        if index not in self._verified:
            self._check_file(path, info, "shard")
            self._verified.add(index)
        elif not path.exists() or path.stat().st_size != info["bytes"]:
            self._check_file(path, info, "shard")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise CrossdiffError(
                f"cannot open shard {path}: {err}; harvest the store again"
            ) from err
        self._check_shard_shape(index, handle)
        self._handles[index] = handle
        if len(self._handles) > _MAX_OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle

    def _check_shard_shape(self, index: int, handle: Any) -> None:
        info = self.manifest["shards"][index]
        expected = [info["n_tokens"], self.n_models, self.d_model]
        try:
            shape = list(handle.get_slice("acts").get_shape())
        except Exception as err:  # no "acts" tensor
            raise CrossdiffError(
                f"shard {info['file']} of store {self.path} has no activations ({err}); "
                "harvest the store again"
            ) from err
        if shape != expected:
            raise CrossdiffError(
                f"shard {info['file']} of store {self.path} holds activations of shape {shape} but "
                f"{MANIFEST} says {expected} (n_tokens, n_models, d_model); the manifest was "
                "edited or belongs to another store: restore it or harvest the store again"
            )

    def _read(self, key: str, start: int, stop: int) -> Tensor:
        if not 0 <= start <= stop <= self.n_tokens:
            raise CrossdiffError(
                f"token range [{start}, {stop}) is outside the store's {self.n_tokens} tokens"
            )
        first = int(torch.searchsorted(self._starts, start, right=True)) - 1
        pieces = []
        index = max(first, 0)
        while index < self.n_shards and int(self._starts[index]) < stop:
            lo = max(start, int(self._starts[index])) - int(self._starts[index])
            hi = min(stop, int(self._starts[index + 1])) - int(self._starts[index])
            pieces.append(self._shard(index).get_slice(key)[lo:hi])
            index += 1
        if not pieces:
            return self._empty(key)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _empty(self, key: str) -> Tensor:
        if key == "acts":
            return torch.zeros(0, self.n_models, self.d_model, dtype=self.dtype)
        if key == "experts":
            return torch.zeros(0, self.manifest["experts"]["width"], dtype=torch.long)
        return torch.zeros(0, dtype=torch.long)

    def read_acts(
        self, start: int = 0, stop: int | None = None, normalize: bool = False
    ) -> Float[Tensor, "n n_models d_model"]:
        """Activations of tokens [start, stop) in store order, in the store's dtype (float32 if
        normalize: multiplied by the scaling factors)."""
        stop = self.n_tokens if stop is None else stop
        acts = self._read("acts", start, stop)
        if normalize:
            acts = acts.to(torch.float32) * self.scaling_factors[None, :, None]
        return acts

    def read_metadata(self, start: int = 0, stop: int | None = None) -> dict[str, Tensor]:
        """token_ids, doc_ids, positions, domains [n] and experts [n, width] as int64 tensors."""
        stop = self.n_tokens if stop is None else stop
        return {key: self._read(key, start, stop).long() for key in METADATA_KEYS}

    def iter_batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        normalize: bool = True,
        loop: bool = True,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        shuffle_buffer: int | None = None,
        chunk_tokens: int = 4096,
    ) -> Iterator[Float[Tensor, "batch n_models d_model"]]:
        """Training batches [batch_size, n_models, d_model]; every batch is full.

        With shuffle, each pass visits the shards in an order drawn from `seed`, the chunks of a
        shard in a drawn order, and mixes tokens in a buffer of `shuffle_buffer` tokens (default
        max(32 * batch_size, 4 * chunk_tokens)); two readers with the same seed yield the same
        batches. With loop=False one pass is made and the last partial batch is dropped (read the
        whole store in order with read_acts).
        """
        if batch_size <= 0:
            raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
        if self.n_tokens == 0:
            raise CrossdiffError(f"store {self.path} has no tokens; harvest into it first")
        if not loop and batch_size > self.n_tokens:
            raise CrossdiffError(
                f"batch_size {batch_size} is larger than the store's {self.n_tokens} tokens, so "
                "one pass (loop=False) yields no full batch; use a smaller batch or loop=True"
            )
        generator = torch.Generator().manual_seed(seed)
        capacity = max(shuffle_buffer or max(16 * batch_size, 4 * chunk_tokens), 2 * batch_size)
        scale = self.scaling_factors[None, :, None] if normalize else None
        expected = (batch_size, self.n_models, self.d_model)
        pending: list[Tensor] = []
        n_pending = 0

        def emit(buffer: Tensor, n_out: int) -> Iterator[Tensor]:
            for lo in range(0, n_out, batch_size):
                batch = buffer[lo : lo + batch_size].to(torch.float32)
                if scale is not None:
                    batch = batch * scale
                if tuple(batch.shape) != expected:
                    raise CrossdiffError(
                        f"internal error: batch of shape {tuple(batch.shape)}, expected {expected}"
                    )
                yield batch.to(device=device, dtype=dtype)

        while True:
            order = (
                torch.randperm(self.n_shards, generator=generator)
                if shuffle
                else torch.arange(self.n_shards)
            )
            for index in order.tolist():
                info = self.manifest["shards"][index]
                bounds = list(range(0, info["n_tokens"], chunk_tokens))
                if shuffle:
                    bounds = [bounds[i] for i in torch.randperm(len(bounds), generator=generator)]
                for lo in bounds:
                    hi = min(lo + chunk_tokens, info["n_tokens"])
                    pending.append(self._shard(index).get_slice("acts")[lo:hi])
                    n_pending += hi - lo
                    if n_pending < (capacity if shuffle else batch_size):
                        continue
                    buffer = torch.cat(pending)
                    if shuffle:
                        buffer = buffer[torch.randperm(len(buffer), generator=generator)]
                        n_out = (len(buffer) - capacity // 2) // batch_size * batch_size
                    else:
                        n_out = len(buffer) // batch_size * batch_size
                    yield from emit(buffer, n_out)
                    pending, n_pending = [buffer[n_out:]], len(buffer) - n_out
            if not loop:
                break
        if n_pending >= batch_size:
            buffer = torch.cat(pending)
            if shuffle:
                buffer = buffer[torch.randperm(len(buffer), generator=generator)]
            yield from emit(buffer, len(buffer) // batch_size * batch_size)
