"""LiveActivations: paired activations computed from the two models while the crosscoder trains,
with no store on disk.

A live source is the training part of the store `harvest` would write from the same arguments,
computed on demand. It lays the kept tokens out in the same shards (`shard_tokens` each), holds
out the same documents (`heldout_documents`), runs the models with the harvest's own code
(`prepare_job` and `fill`, the same fixed model batches) and feeds the trainer through the store's
shuffle (`shuffled_rows`, over token indices). So with the same seed it yields the rows a store
yields, in the same order, and a crosscoder trained from it equals one trained from the store.

Memory: the shuffle buffer (`shuffle_buffer` tokens of indices) and the computed shards kept in
host memory, least recently used first out, up to `cache_bytes` (a shard is computed again if an
evicted one is needed; a source whose shards all fit is computed once). The scaling factors come
from the training tokens of the first shards, at least `scale_tokens` of them (default 2**20;
None: all, as a store's; a source with fewer training tokens uses all). Under torchrun the
ranks split the model work of each shard, gather it, and each takes its share of every batch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from crossdiff.activations.harvest_job import HarvestJob, HarvestOptions, fill, prepare_job
from crossdiff.activations.identity import LensModel
from crossdiff.activations.normalization import RunningStats
from crossdiff.activations.pairing import Pairing
from crossdiff.activations.runner import eval_mode
from crossdiff.activations.shuffle import shuffled_rows
from crossdiff.activations.source import ActivationSource
from crossdiff.activations.store import StoreWriter, mask_ranges
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import DistInfo, dist_info, shard_rows
from crossdiff.plumbing.fingerprint import fingerprint

SCALE_TOKENS = 2**20  # training tokens the scaling factors are estimated on (whole shards)


class _Capture(StoreWriter):
    """A StoreWriter that keeps the one shard `fill` writes in memory (no disk)."""

    def __init__(self) -> None:  # no folder, manifest or statistics
        self.tensors: dict[str, Tensor] | None = None

    def write_shard(self, tensors: dict[str, Tensor]) -> None:
        if self.tensors is not None:
            raise CrossdiffError("internal error: a live shard was written twice")
        self.tensors = tensors


class _NoBar:
    def update(self, n: int) -> None:
        pass


class LiveActivations(ActivationSource):
    """The training part of a paired harvest, computed on demand: an ActivationSource (source.py)
    that reads as the store `harvest` would write from the same arguments reads its training
    part."""

    part_name = "train"

    def __init__(
        self,
        model_a: LensModel,
        model_b: LensModel,
        token_set: TokenSet | Tensor,
        pairing: Pairing | str | Path,
        *,
        n_tokens: int | None = None,
        batch_size: int = 32,
        dtype: str | torch.dtype = "float16",
        shard_tokens: int | None = None,
        model_names: tuple[str, str] = ("dense", "moe"),
        device: str | torch.device | None = None,
        heldout_fraction: float = 0.1,
        split_seed: int = 0,
        tokenizer: Any = None,
        scale_tokens: int | None = SCALE_TOKENS,
        cache_bytes: int = 2 * 2**30,
    ) -> None:
        if cache_bytes < 0:
            raise CrossdiffError(f"cache_bytes={cache_bytes} must be >= 0")
        info = dist_info()
        self.models = (model_a, model_b)
        with eval_mode(self.models):
            options = HarvestOptions(
                n_tokens=n_tokens, batch_size=batch_size, dtype=dtype, shard_tokens=shard_tokens,
                model_names=model_names, device=device, tokenizer=tokenizer,
                heldout_fraction=heldout_fraction, split_seed=split_seed,
            )  # fmt: skip
            self.job: HarvestJob = prepare_job(
                model_a, model_b, token_set, pairing, options, verbose=info.is_main
            )
        job = self.job
        # the kept tokens in harvest order (row by row), and which belong to held-out documents
        kept_docs = job.rows.doc_ids[job.rows.keep][: job.target]
        self.heldout: Tensor = torch.isin(kept_docs, job.heldout_docs)
        self.shard_tokens = job.shard_tokens
        self.total_tokens = job.target
        self.n_shards = math.ceil(job.target / job.shard_tokens)
        self._pieces = [
            [(lo, hi) for lo, hi in mask_ranges(~self.heldout[self._bounds(i)])]
            for i in range(self.n_shards)
        ]
        self._n_train = int((~self.heldout).sum())
        self.scale_tokens = scale_tokens
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, Tensor] = OrderedDict()
        self._scaling: Tensor | None = None
        self.shards_computed = 0  # model passes over a shard (a re-computed shard counts again)
        self.manifest_header = dict(job.header, segments=[dict(job.segment)])
        # every rank builds the source, so every rank makes this group, in the same order
        self._group = dist.new_group(backend="gloo") if info.enabled else None

    def _bounds(self, index: int) -> slice:
        lo = index * self.shard_tokens
        return slice(lo, min(lo + self.shard_tokens, self.total_tokens))

    def __repr__(self) -> str:
        return (
            f"LiveActivations(n_tokens={self.n_tokens} training of {self.total_tokens}, "
            f"models={self.model_names}, d_models={self.d_models}, shards={self.n_shards})"
        )

    # --- the store's reading interface ---------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Training tokens (the held-out documents' tokens are never read)."""
        return self._n_train

    @property
    def n_models(self) -> int:
        return 2

    @property
    def d_model(self) -> int:
        return self.job.d_store

    @property
    def d_models(self) -> list[int]:
        return list(self.job.widths)

    @property
    def model_names(self) -> list[str]:
        return list(self.job.header["model_names"])

    @property
    def domain_names(self) -> list[str]:
        return list(self.job.header["domain_names"])

    @property
    def dtype(self) -> torch.dtype:
        return self.job.store_dtype

    def _train_rows(self, start: int, stop: int | None) -> Tensor:
        """Positions among the kept tokens of training tokens [start, stop)."""
        stop = self.n_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.n_tokens:
            raise CrossdiffError(
                f"token range [{start}, {stop}) is outside the source's {self.n_tokens} "
                "training tokens"
            )
        return (~self.heldout).nonzero().flatten()[start:stop]

    def read_acts(
        self, start: int = 0, stop: int | None = None, normalize: bool = False
    ) -> Float[Tensor, "n n_models d_model"]:
        """Activations of training tokens [start, stop) in harvest order, as a store's training
        part reads them (computing the shards they lie in)."""
        acts = self.gather(self._train_rows(start, stop))
        if normalize:
            acts = acts.to(torch.float32) * self.scaling_factors[None, :, None]
        return acts

    def read_metadata(self, start: int = 0, stop: int | None = None) -> dict[str, Tensor]:
        """token_ids, doc_ids, positions, domains [n] of training tokens [start, stop), from the
        token set (no model runs; the experts a store records are not kept by a live source)."""
        rows = self.job.rows
        index = self._train_rows(start, stop)
        domains = rows.domains[:, None].expand_as(rows.tokens)
        return {
            key: values[rows.keep][index].long()
            for key, values in (
                ("token_ids", rows.tokens),
                ("doc_ids", rows.doc_ids),
                ("positions", rows.positions),
                ("domains", domains),
            )
        }

    @property
    def fingerprint(self) -> str:
        """What the activations depend on: models, pairing, token set, split, layout, scaling."""
        return fingerprint(
            {
                "live": self.manifest_header,
                "n_tokens": self.total_tokens,
                "shard_tokens": self.shard_tokens,
                "scale_tokens": self.scale_tokens,
            }
        )

    @property
    def scaling_factors(self) -> Float[Tensor, " n_models"]:
        """Per-model factors bringing the mean norm to sqrt(d_m), from the training tokens of the
        first shards (at least `scale_tokens`; None: all), accumulated as the store does."""
        if self._scaling is None:
            stats = RunningStats(self.d_models)
            seen = 0
            for index in range(self.n_shards):
                if self.scale_tokens is not None and seen >= self.scale_tokens:
                    break
                train = ~self.heldout[self._bounds(index)]
                stats = RunningStats.from_tensors(self.d_models, stats.to_tensors())
                stats.update(self.shard_acts(index)[train])
                seen += int(train.sum())
            factors = [float(x) for x in stats.scaling_factors()]
            self._scaling = torch.tensor(factors, dtype=torch.float32)
        return self._scaling

    source_label = "the live source"
    empty_advice = "give it more tokens (n_tokens) or a smaller heldout_fraction"

    def raw_batches(
        self, batch_size: int, *, seed: int, shuffle: bool, loop: bool, capacity: int,
        chunk_tokens: int, skip: int, part: DistInfo | None,
    ) -> Iterator[Tensor]:  # fmt: skip
        """The batches ActivationStore yields for the same arguments: the shuffle runs over row
        indices, and only the batches after `skip` are gathered (their shards computed); `part`
        gives this rank's rows of each global batch, computing only the shards they need."""
        indices = shuffled_rows(
            self.n_shards,
            lambda index: self._pieces[index],
            lambda index, lo, hi: torch.arange(lo, hi) + index * self.shard_tokens,
            batch_size,
            seed=seed,
            shuffle=shuffle,
            loop=loop,
            capacity=capacity,
            chunk_tokens=chunk_tokens,
        )
        for step, rows in enumerate(indices):
            if step >= skip:
                yield self.gather(rows, part)

    def gather(
        self, rows: Tensor, part: DistInfo | None = None
    ) -> Float[Tensor, "n n_models d_model"]:
        """Activations (store dtype) of kept tokens `rows` (or this rank's part of them)."""
        shards = rows // self.shard_tokens
        # every rank computes the shards of the whole global batch, in the same order, so the
        # collectives of a computed shard line up
        resident = {index: self.shard_acts(index) for index in torch.unique(shards).tolist()}
        if part is not None:
            rows, shards = shard_rows(rows, part), shard_rows(shards, part)
        out = torch.empty(len(rows), self.n_models, self.d_model, dtype=self.dtype)
        for index, acts in resident.items():
            mask = shards == index
            out[mask] = acts[rows[mask] - index * self.shard_tokens]
        return out

    # --- computing shards ----------------------------------------------------------------------

    def shard_acts(self, index: int) -> Float[Tensor, "n n_models d_model"]:
        """The activations of shard `index` (all its rows, store dtype), computed if not cached."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        acts = self._compute(index)
        self._cache[index] = acts
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > (
            self.cache_bytes
        ):
            self._cache.popitem(last=False)
        return acts

    def _compute(self, index: int) -> Tensor:
        """Run the models on the tokens of shard `index`; under torchrun each rank runs its own
        contiguous part of them and the parts are gathered (a harvest's batches, so the values
        equal a single-process run's)."""
        bounds = self._bounds(index)
        info = dist_info()
        n = bounds.stop - bounds.start
        per_rank = math.ceil(n / info.world_size)
        lo = bounds.start + min(n, info.rank * per_rank)
        hi = bounds.start + min(n, (info.rank + 1) * per_rank)
        acts = torch.zeros(per_rank, self.n_models, self.d_model, dtype=self.dtype)
        if hi > lo:
            capture = _Capture()
            with eval_mode(self.models):
                fill(self.job, capture, lo, hi, _NoBar())
            assert capture.tensors is not None
            acts[: hi - lo] = capture.tensors["acts"]
        self.shards_computed += 1
        if info.world_size == 1:
            return acts[:n]
        # as bytes over the source's own gloo group: any dtype, and the prefetch thread's
        # collectives never interleave with the trainer's on the default group
        raw = acts.view(torch.uint8)
        parts = [torch.empty_like(raw) for _ in range(info.world_size)]
        dist.all_gather(parts, raw, group=self._group)
        return torch.cat(parts).view(self.dtype)[:n]
