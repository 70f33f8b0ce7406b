"""The shuffle every training reader shares: shards in a seeded order, their chunks in a seeded
order, tokens mixed in a buffer.

`shuffled_rows` only moves rows around; what a row is comes from `read`. A store reads its
activations from disk; the live source reads token indices (cheap) and looks the activations up
afterwards. The random draws depend only on the shard layout and the seed, never on the values,
so two readers over the same layout with the same seed emit the same rows in the same order:
that is what makes training from a live source equal to training from a store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.common import CrossdiffError
from crossdiff.distributed import DistInfo


def buffer_capacity(batch_size: int, shuffle_buffer: int | None, chunk_tokens: int) -> int:
    """Tokens the shuffle buffer fills up to before it emits (the store's default)."""
    return max(shuffle_buffer or max(16 * batch_size, 4 * chunk_tokens), 2 * batch_size)


def shuffled_rows(
    n_shards: int,
    pieces_of: Callable[[int], list[tuple[int, int]]],
    read: Callable[[int, int, int], Tensor],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool,
    loop: bool,
    capacity: int,
    chunk_tokens: int,
) -> Iterator[Tensor]:
    """Batches of `batch_size` rows of what `read(shard, lo, hi)` returns.

    pieces_of(shard): the [lo, hi) row ranges of the shard to read, in order. With shuffle, each
    pass visits the shards in an order drawn from `seed`, the chunks (<= chunk_tokens rows) of a
    shard in a drawn order, and mixes rows in a buffer filled to `capacity` rows, of which all
    but capacity // 2 are emitted each time. With loop=False one pass is made, and the rows left
    at the end are emitted in full batches (the partial one is dropped).
    """
    generator = torch.Generator().manual_seed(seed)
    pending: list[Tensor] = []
    n_pending = 0
    while True:
        order = torch.randperm(n_shards, generator=generator) if shuffle else torch.arange(n_shards)
        for index in order.tolist():
            bounds = [
                (lo, min(lo + chunk_tokens, piece_hi))
                for piece_lo, piece_hi in pieces_of(index)
                for lo in range(piece_lo, piece_hi, chunk_tokens)
            ]
            if shuffle:
                bounds = [bounds[i] for i in torch.randperm(len(bounds), generator=generator)]
            for lo, hi in bounds:
                pending.append(read(index, lo, hi))
                n_pending += hi - lo
                if n_pending < (capacity if shuffle else batch_size):
                    continue
                buffer = torch.cat(pending)
                if shuffle:
                    buffer = buffer[torch.randperm(len(buffer), generator=generator)]
                    n_out = (len(buffer) - capacity // 2) // batch_size * batch_size
                else:
                    n_out = len(buffer) // batch_size * batch_size
                for lo_out in range(0, n_out, batch_size):
                    yield buffer[lo_out : lo_out + batch_size]
                pending, n_pending = [buffer[n_out:]], len(buffer) - n_out
        if not loop:
            break
    if n_pending >= batch_size:
        buffer = torch.cat(pending)
        if shuffle:
            buffer = buffer[torch.randperm(len(buffer), generator=generator)]
        for lo_out in range(0, len(buffer) // batch_size * batch_size, batch_size):
            yield buffer[lo_out : lo_out + batch_size]


class BatchedSource(ABC):
    """`iter_batches` of a source (ActivationSource), written once: the argument checks, the
    scaling, the dtype and the device. A subclass yields its raw batches (`raw_batches`), says
    what it is (`source_label`) and whether one pass drops the last partial batch."""

    n_tokens: int
    scaling_factors: Tensor  # [n_models]
    drops_partial_batch = True  # a one-pass read (loop=False) drops the rows that do not fill one
    empty_advice = "harvest into it first"  # what to do when it has no tokens

    @property
    @abstractmethod
    def source_label(self) -> str:
        """How errors name this source ("the store runs/x/store")."""

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
