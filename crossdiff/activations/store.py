"""ActivationStore: paired activations on disk, sharded safetensors plus a JSON manifest.

The layout (file names, manifest fields; format in docs/store.md) is in store_layout.py.
A shard's `file` in the manifest is a path relative to the store folder.

Parts: a store harvested with a document split (manifest `split`) marks the tokens of its
held-out documents per shard (`heldout`: [lo, hi) ranges of shard rows); every other token is
training. `store.part("train")` / `store.part("heldout")` are views with the store's reading
interface over one part; the statistics and scaling factors are those of the training part.

StoreWriter (store_writer.py) appends to a store; checked_files.py checks and opens its files. Both
writers' and readers' names stay importable from here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.activations.checked_files import (
    ShardFiles,
    read_manifest,
    read_running_stats,
    sha256_file,
)
from crossdiff.activations.normalization import RunningStats
from crossdiff.activations.shuffle import shuffled_rows
from crossdiff.activations.source import ActivationSource
from crossdiff.activations.store_layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    METADATA_KEYS,
    PARTS,
    expert_column_map,
    mask_ranges,
    part_counts,
    shard_name,
    stats_name,
)
from crossdiff.activations.store_writer import StoreWriter, write_store_file
from crossdiff.plumbing.common import CrossdiffError, resolve_dtype
from crossdiff.plumbing.distributed import DistInfo, shard_rows

__all__ = [  # the layout's, shards' and writer's names are re-exported: store.py was their home
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


class ActivationStore(ActivationSource):
    """A store folder, read lazily: shards are memory-mapped; only requested rows are read."""

    def __init__(self, path: str | Path, part: str | None = None) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.manifest: dict[str, Any] = manifest
        self._files = ShardFiles(self.path, manifest)
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
        # a shard's checksum is checked once for all views
        view._files = ShardFiles(self.path, self.manifest, verified=self._files.verified)
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
        return read_running_stats(self.path, self.manifest)

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

    def verify(self) -> None:
        """Check the size and checksum of every shard (reading also checks each once, lazily)."""
        for i in range(self.n_shards):
            self._shard(i)

    def _shard(self, index: int) -> Any:
        return self._files.get(index)

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

    @property
    def source_label(self) -> str:
        where = "" if self.part_name == "all" else f" (its {self.part_name} part)"
        return f"the store {self.path}{where}"

    def raw_batches(
        self, batch_size: int, *, seed: int, shuffle: bool, loop: bool, capacity: int,
        chunk_tokens: int, skip: int, part: DistInfo | None,
    ) -> Iterator[Tensor]:  # fmt: skip
        """Batches read from the shards (the store's dtype); skipped ones are read and dropped."""
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
        for step, batch in enumerate(rows):
            if tuple(batch.shape) != expected:
                raise CrossdiffError(
                    f"internal error: batch of shape {tuple(batch.shape)}, expected {expected}"
                )
            if step >= skip:
                yield batch if part is None else shard_rows(batch, part)


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
