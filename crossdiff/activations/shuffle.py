"""The shuffle every training reader shares: shards in a seeded order, their chunks in a seeded
order, tokens mixed in a buffer.

`shuffled_rows` only moves rows around; what a row is comes from `read`. A store reads its
activations from disk; the live source reads token indices (cheap) and looks the activations up
afterwards. The random draws depend only on the shard layout and the seed, never on the values,
so two readers over the same layout with the same seed emit the same rows in the same order:
that is what makes training from a live source equal to training from a store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


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
