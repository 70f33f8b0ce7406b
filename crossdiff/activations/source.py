"""ActivationSource: the one data contract between the activations, crosscoder and analysis stages.

Paired activations [n_tokens, n_models, d_model] (models of smaller width zero-padded to d_model)
with per-token metadata, readable in order (`read_acts`, `read_metadata`) and as training batches
(`iter_batches`). What implements it:

    ActivationStore            a store on disk (store.py), and any part of it: store.part("heldout")
    LiveActivations            the training part of a harvest, computed on demand (live.py)
    InMemoryStore              activations in a tensor (crosscoder/synthetic.py)

Training reads `iter_batches` and `scaling_factors`; evaluation and analysis read `read_acts`
and `read_metadata` (whose keys are a subset of layout.METADATA_KEYS: a source without metadata
returns an empty dict).

It is an abstract base class, not a structural protocol: `iter_batches` (the argument checks, the
scaling, the dtype and the device) is written once here and each source yields only its raw
batches, and `isinstance(x, ActivationSource)` (what beartype checks on every function typed with
it) costs nothing, where a runtime-checkable protocol on Python 3.11 reads every member, and a
live source's `scaling_factors` runs the models on its first shards. A source of your own
subclasses it and implements the abstract members.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.activations.shuffle import buffer_capacity
from crossdiff.plumbing.api_checks import given
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import DistInfo


class ActivationSource(ABC):
    """Paired activations and per-token metadata (see the module's docstring).

    Attributes (or properties) a source has:
        n_tokens         tokens this source reads (a store's view: the whole store or one part)
        n_models, d_model   the stored width d_model is the largest of `d_models`
        d_models         each model's own width
        model_names      one name per model
        domain_names     names of the `domains` metadata indices (empty without domains)
        scaling_factors  [n_models]: multiply model m's raw activations by factor m to bring
                         their mean norm to sqrt(d_m)
    """

    n_tokens: int
    n_models: int
    d_model: int
    d_models: Sequence[int]
    model_names: Sequence[str]
    domain_names: Sequence[str]
    scaling_factors: Tensor
    drops_partial_batch = True  # a one-pass read (loop=False) drops the rows that do not fill one
    empty_advice = "harvest into it first"  # what to do when it has no tokens

    @property
    @abstractmethod
    def source_label(self) -> str:
        """How errors name this source ("the store runs/x/store")."""

    @abstractmethod
    def read_acts(
        self, start: int = 0, stop: int | None = None, normalize: bool = False
    ) -> Float[Tensor, "n n_models d_model"]:
        """Activations of tokens [start, stop) in the source's order (raw unless normalize)."""

    @abstractmethod
    def read_metadata(self, start: int = 0, stop: int | None = None) -> dict[str, Tensor]:
        """Per-token metadata of tokens [start, stop), int64, keyed by layout.METADATA_KEYS."""

    @abstractmethod
    def raw_batches(
        self, batch_size: int, *, seed: int, shuffle: bool, loop: bool, capacity: int,
        chunk_tokens: int, skip: int, part: DistInfo | None,
    ) -> Iterator[Tensor]:  # fmt: skip
        """Unscaled batches (any float dtype, CPU), the first `skip` of them left out."""

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
        skip: int = 0,
        part: DistInfo | None = None,
    ) -> Iterator[Float[Tensor, "batch n_models d_model"]]:
        """Training batches [batch_size, n_models, d_model], scaled by `scaling_factors` when
        normalize, shuffled by `seed`; endless when loop. Two readers with the same seed yield the
        same batches.

        A store (and a live source) visits the shards in an order drawn from `seed`, the chunks
        (<= chunk_tokens rows) of a shard in a drawn order, and mixes tokens in a buffer of
        `shuffle_buffer` tokens (default max(16 * batch_size, 4 * chunk_tokens)); with loop=False
        it makes one pass and drops the last partial batch (read a whole store in order with
        read_acts). `skip` leaves out the first batches (a resumed run); `part` keeps this
        rank's rows of each batch (distributed.shard_rows).
        """
        if batch_size <= 0:
            raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
        if self.n_tokens == 0:
            raise CrossdiffError(f"{self.source_label} has no tokens; {self.empty_advice}")
        if not loop and self.drops_partial_batch and batch_size > self.n_tokens:
            raise CrossdiffError(
                f"batch_size {batch_size} is larger than {self.source_label}'s {self.n_tokens} "
                "tokens, so one pass (loop=False) yields no full batch; use a smaller batch or "
                "loop=True"
            )
        scale = self.scaling_factors[None, :, None] if normalize else None
        raw = self.raw_batches(
            batch_size, seed=seed, shuffle=shuffle, loop=loop,
            capacity=buffer_capacity(batch_size, shuffle_buffer, chunk_tokens),
            chunk_tokens=chunk_tokens, skip=skip, part=part,
        )  # fmt: skip
        for batch in raw:
            batch = batch.to(torch.float32)
            if scale is not None:
                batch = batch * scale
            yield batch.to(device=device, dtype=dtype)


def check_activations(acts: Any, function: str, name: str = "acts") -> None:
    """`acts` is a Tensor [n_tokens, n_models, d_model] or an ActivationSource (e.g. a store)."""
    if isinstance(acts, (torch.Tensor, ActivationSource)):
        return
    hint = ""
    if isinstance(acts, (str, os.PathLike)):
        hint = f"; to read the store at {os.fspath(acts)}, pass crossdiff.ActivationStore(path)"
    raise CrossdiffError(
        f"{function}: {name} must be a Tensor [n_tokens, n_models, d_model] or an activation "
        f"store (crossdiff.ActivationStore), got {given(acts)}{hint}"
    )
