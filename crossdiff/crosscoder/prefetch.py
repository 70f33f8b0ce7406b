"""Read training batches ahead of the GPU: a background thread pulls batches from the (CPU-side)
source and pins them; the training loop copies them to the device without blocking the host."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

_DONE = object()


def prefetch_to_device(
    batches: Iterator[Tensor], device: torch.device, depth: int = 2
) -> Iterator[Tensor]:
    """The batches of `batches`, in order, on `device`; up to `depth` are read ahead by a thread.

    An exception in the source is raised here, at the batch where it happened. depth=0 reads in
    the caller's thread. On CUDA the batches are pinned and copied with non_blocking=True, so
    the copy overlaps the previous step's kernels instead of stalling the host.
    """
    pin = device.type == "cuda"
    if depth <= 0:
        for batch in batches:
            yield _to_device(batch.pin_memory() if pin else batch, device)
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        """Put `item` unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer(batch.pin_memory() if pin else batch):
                    return
            offer(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            offer(err)

    thread = threading.Thread(target=produce, name="crossdiff-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield _to_device(item, device)
    finally:
        # stop and wait for the reader, so that no thread is inside torch at interpreter exit
        stop.set()
        thread.join()


def _to_device(batch: Tensor, device: torch.device) -> Tensor:
    return batch.to(device, non_blocking=batch.is_pinned())
