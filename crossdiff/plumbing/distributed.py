"""torch.distributed under torchrun: joining the process group, rank devices and the few
collectives the stages use.

Launch any stage with `torchrun --nproc_per_node N -m crossdiff <stage> ...`. torchrun sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them and joins
the group (gloo for CPU tensors, NCCL for CUDA ones). Outside torchrun everything here is a
no-op for a world of one process, so the stages call these helpers unconditionally.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from crossdiff.plumbing.common import CrossdiffError, resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (once); a world of one outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_available():
        raise CrossdiffError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process"
        )
    needed = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise CrossdiffError(
            f"WORLD_SIZE is set but {missing} are not; launch with `torchrun --nproc_per_node N "
            "-m crossdiff ...`, which sets them all"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return dist_info()


def abort_distributed(code: int) -> NoReturn:
    """Leave at once with `code` after a failure in a torchrun job.

    Unwinding an exception past a DistributedDataParallel can deadlock: its reducer, freed while
    the traceback is dropped, destroys the gloo process group, whose worker thread then waits for
    the GIL the destructor holds. torchrun sees the exit code and stops the other ranks."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def distributed_job() -> Iterator[DistInfo]:
    """For a script run by torchrun: join the process group for the block, leave it cleanly
    when the block succeeds and at once (abort_distributed) when it fails."""
    info = init_distributed()
    try:
        yield info
    except BaseException as err:
        if info.enabled:
            traceback.print_exc()
            code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
            abort_distributed(code)
        raise
    finish_distributed()


def finish_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def dist_info() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
    )


def rank_device(device: str | torch.device | None) -> torch.device:
    """The device this rank computes on: `cuda` becomes `cuda:LOCAL_RANK` under torchrun."""
    resolved = resolve_device(device)
    info = dist_info()
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return resolved


def compute_device(device: str | torch.device | None) -> torch.device:
    """The device this process computes on: under torchrun this rank's own (rank_device), alone
    the one asked for (resolve_device; `cuda` stays `cuda`)."""
    return rank_device(device) if dist_info().enabled else resolve_device(device)


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[DistInfo]:
    """Rank 0 runs the block first (e.g. writes a cache); the others run it after, and find the
    work done."""
    info = dist_info()
    if not info.is_main:
        barrier()
    try:
        yield info
    finally:
        if info.is_main:
            barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in one process)."""
    if dist_info().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    if dist_info().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_min_(tensor: torch.Tensor) -> torch.Tensor:
    if dist_info().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every rank along dim 0, in rank order."""
    info = dist_info()
    if not info.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_module_(module: torch.nn.Module) -> torch.nn.Module:
    """Give every rank rank 0's parameters and buffers (in place)."""
    if dist_info().enabled:
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)
    return module


def check_same_on_all_ranks(value: int, what: str) -> None:
    """Fail on every rank, with the same message, if ranks disagree on an integer setting."""
    info = dist_info()
    if not info.enabled:
        return
    t = torch.tensor([value, -value], dtype=torch.long)
    all_reduce_max_(t)
    if int(t[0]) != -int(t[1]):
        raise CrossdiffError(
            f"the ranks disagree on {what} (from {-int(t[1])} to {int(t[0])}); every rank must "
            "run the same command on the same data"
        )


def shard_rows(rows: torch.Tensor, info: DistInfo | None = None) -> torch.Tensor:
    """This rank's part of a global batch: rows rank, rank + N, ... (disjoint, all covered)."""
    info = info or dist_info()
    if len(rows) % info.world_size:
        raise CrossdiffError(
            f"a global batch of {len(rows)} does not split evenly over {info.world_size} "
            "processes; use a batch size divisible by the number of processes"
        )
    return rows[info.rank :: info.world_size]
