"""ActivationStore: paired activations on disk, sharded safetensors plus a JSON manifest.

The layout (file names, manifest fields; format in docs/store.md) is in layout.py.
A shard's `file` in the manifest is a path relative to the store folder.

Parts: a store harvested with a document split (manifest `split`) marks the tokens of its
held-out documents per shard (`heldout`: [lo, hi) ranges of shard rows); every other token is
training. `store.part("train")` / `store.part("heldout")` are views with the store's reading
interface over one part; the statistics and scaling factors are those of the training part.

Writes go shard first, then statistics, then the manifest, each atomically: a crash leaves at most
an orphan file that the next writer removes, never a manifest that names a missing or partial shard.
"""

from __future__ import annotations

import errno
import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from crossdiff.activations.layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    METADATA_KEYS,
    PARTS,
    check_manifest,
    expert_column_map,
    is_store_file,
    mask_ranges,
    part_counts,
    shard_name,
    stats_name,
)
from crossdiff.activations.normalization import RunningStats
from crossdiff.activations.shuffle import buffer_capacity, shuffled_rows
from crossdiff.common import (
    CrossdiffError,
    DiskFullError,
    atomic_path,
    read_json,
    resolve_dtype,
    write_json_atomic,
)

_MAX_OPEN_SHARDS = 8

__all__ = [  # the layout's names are re-exported: store.py was their home
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "METADATA_KEYS",
    "PARTS",
    "ActivationStore",
    "StoreWriter",
    "evaluation_part",
    "expert_column_map",
    "mask_ranges",
    "part_counts",
    "sha256_file",
    "shard_name",
    "stats_name",
    "training_part",
    "write_store_file",
]


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


class ActivationStore:
    """A store folder, read lazily: shards are memory-mapped; only requested rows are read."""

    def __init__(self, path: str | Path, part: str | None = None) -> None:
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
        check_manifest(self.path / MANIFEST, manifest)
        self.manifest: dict[str, Any] = manifest
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._verified: set[int] = set()
        self.part_name = self._check_part(part)
        # the view: per shard, the [lo, hi) row ranges it reads, in store order
        self._pieces: list[list[tuple[int, int]]] = [
            self._shard_pieces(shard) for shard in manifest["shards"]
        ]
        flat = [(i, lo, hi) for i, pieces in enumerate(self._pieces) for lo, hi in pieces]
        self._flat = flat
        lengths = torch.tensor([hi - lo for _, lo, hi in flat], dtype=torch.long)
        self._starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self._n_view = int(self._starts[-1])

    def __repr__(self) -> str:
        part = "" if self.part_name == "all" else f", part={self.part_name!r}"
        return (
            f"ActivationStore({str(self.path)!r}{part}, n_tokens={self.n_tokens}, "
            f"models={self.model_names}, d_models={self.d_models}, dtype={self.manifest['dtype']})"
        )

    # --- parts -------------------------------------------------------------------------------

    def _check_part(self, part: str | None) -> str:
        if part is None or part == "all":
            return "all"
        if part not in PARTS:
            raise CrossdiffError(
                f"unknown store part {part!r}; a store has parts {list(PARTS)} (or 'all')"
            )
        if part == "heldout" and not self.has_heldout:
            raise CrossdiffError(
                f"store {self.path} has no held-out tokens ({self._split_note()}); evaluate on "
                "part='train', or harvest again with heldout_fraction > 0"
            )
        return part

    def _split_note(self) -> str:
        if self.manifest.get("split") is None:
            return "it was harvested before stores had a held-out part, so all of it is training"
        return f"heldout_fraction={self.manifest['split'].get('heldout_fraction')}"

    def _shard_pieces(self, shard: dict[str, Any]) -> list[tuple[int, int]]:
        n = int(shard["n_tokens"])
        if self.part_name == "all":
            return [(0, n)] if n else []
        heldout = [(int(lo), int(hi)) for lo, hi in shard.get("heldout", [])]
        if self.part_name == "heldout":
            return heldout
        pieces, at = [], 0
        for lo, hi in heldout:
            if lo > at:
                pieces.append((at, lo))
            at = hi
        if n > at:
            pieces.append((at, n))
        return pieces

    @property
    def has_heldout(self) -> bool:
        """Whether the store has a held-out part with at least one token."""
        return int((self.manifest.get("parts") or {}).get("heldout", 0)) > 0

    @property
    def parts(self) -> dict[str, int]:
        """Tokens per part; a store harvested before parts existed is all training."""
        return dict(self.manifest.get("parts") or {"train": self.total_tokens, "heldout": 0})

    def part(self, name: str) -> ActivationStore:
        """A view of one part ('train', 'heldout' or 'all') with this store's reading interface
        (n_tokens, read_acts, read_metadata, iter_batches, in the part's own token order)."""
        view = ActivationStore(self.path, part=name)
        view._verified = self._verified  # a shard's checksum is checked once for all views
        return view

    @property
    def total_tokens(self) -> int:
        """Tokens in the whole store, all parts."""
        return int(self.manifest["n_tokens"])

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_tokens(self) -> int:
        """Tokens of this view (the whole store, or one part)."""
        return self._n_view

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
        while index < len(self._flat) and int(self._starts[index]) < stop:
            shard, piece_lo, _ = self._flat[index]
            lo = max(start, int(self._starts[index])) - int(self._starts[index])
            hi = min(stop, int(self._starts[index + 1])) - int(self._starts[index])
            if hi > lo:
                pieces.append(self._shard(shard).get_slice(key)[piece_lo + lo : piece_lo + hi])
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
        max(16 * batch_size, 4 * chunk_tokens)); two readers with the same seed yield the same
        batches. With loop=False one pass is made and the last partial batch is dropped (read the
        whole store in order with read_acts).
        """
        if batch_size <= 0:
            raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
        if self.n_tokens == 0:
            where = "" if self.part_name == "all" else f" in its {self.part_name} part"
            raise CrossdiffError(f"store {self.path} has no tokens{where}; harvest into it first")
        if not loop and batch_size > self.n_tokens:
            raise CrossdiffError(
                f"batch_size {batch_size} is larger than the store's {self.n_tokens} tokens, so "
                "one pass (loop=False) yields no full batch; use a smaller batch or loop=True"
            )
        capacity = buffer_capacity(batch_size, shuffle_buffer, chunk_tokens)
        scale = self.scaling_factors[None, :, None] if normalize else None
        expected = (batch_size, self.n_models, self.d_model)
        rows = shuffled_rows(
            self.n_shards,
            lambda index: self._pieces[index],
            lambda index, lo, hi: self._shard(index).get_slice("acts")[lo:hi],
            batch_size,
            seed=seed,
            shuffle=shuffle,
            loop=loop,
            capacity=capacity,
            chunk_tokens=chunk_tokens,
        )
        for raw in rows:
            batch = raw.to(torch.float32)
            if scale is not None:
                batch = batch * scale
            if tuple(batch.shape) != expected:
                raise CrossdiffError(
                    f"internal error: batch of shape {tuple(batch.shape)}, expected {expected}"
                )
            yield batch.to(device=device, dtype=dtype)


def training_part(acts_or_store: Any) -> Any:
    """The part a crosscoder trains on: a store's training part (the whole of a store harvested
    before parts existed); anything else (a tensor, another source) as it is."""
    if not isinstance(acts_or_store, ActivationStore):
        return acts_or_store
    if acts_or_store.part_name == "heldout":
        raise CrossdiffError(
            f"refusing to train on the held-out part of store {acts_or_store.path}: it is kept "
            "for evaluation. Pass the store itself; training reads its training part"
        )
    return acts_or_store.part("train")


def evaluation_part(acts_or_store: Any, part: str | None = None) -> tuple[Any, str]:
    """(the tokens to evaluate on, their label). A store defaults to its held-out part, or to
    its training part with a warning when it has none; `part` ('heldout', 'train', 'all')
    chooses. A tensor (or another source) is evaluated as given, labelled 'given'."""
    if not isinstance(acts_or_store, ActivationStore):
        if part not in (None, "all"):
            raise CrossdiffError(
                f"part={part!r} chooses a part of an ActivationStore, but the activations are a "
                f"{type(acts_or_store).__name__}; pass the store, or leave part=None"
            )
        return acts_or_store, "given"
    if part is None and acts_or_store.part_name != "all":
        part = acts_or_store.part_name  # a view chosen by the caller: evaluate it as it is
    if part is None:
        if acts_or_store.has_heldout:
            part = "heldout"
        else:
            warnings.warn(
                f"store {acts_or_store.path} has no held-out tokens "
                f"({acts_or_store._split_note()}); evaluating on training tokens, which "
                "overstates how well the crosscoder generalizes",
                UserWarning,
                stacklevel=3,
            )
            part = "train"
    view = acts_or_store.part(part)
    if view.n_tokens == 0:
        raise CrossdiffError(f"the {part} part of store {acts_or_store.path} has no tokens")
    return view, part
