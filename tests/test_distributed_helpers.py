"""crossdiff.plumbing.distributed outside torchrun (a world of one) and its input checks."""

import pytest
import torch

import crossdiff.crosscoder.train as trainer_module
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import (
    DistInfo,
    all_gather_cat,
    all_reduce_sum_,
    dist_info,
    init_distributed,
    shard_rows,
)


def test_outside_torchrun_everything_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == dist_info() == DistInfo(rank=0, world_size=1, local_rank=0)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_sum_(t), torch.tensor([1.0, 2.0]))
    assert torch.equal(all_gather_cat(t), t)
    assert torch.equal(shard_rows(torch.arange(6)), torch.arange(6))


def test_half_a_torchrun_environment_is_refused_with_the_launch_command(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(CrossdiffError, match="torchrun --nproc_per_node N"):
        init_distributed()


def test_shard_rows_gives_each_rank_a_disjoint_part_and_refuses_uneven_batches():
    rows = torch.arange(10, 18)
    parts = [shard_rows(rows, DistInfo(rank=r, world_size=4)) for r in range(4)]
    assert sorted(torch.cat(parts).tolist()) == rows.tolist()
    assert parts[1].tolist() == [11, 15]
    with pytest.raises(CrossdiffError, match="divisible by the number of processes"):
        shard_rows(torch.arange(6), DistInfo(rank=0, world_size=4))


def test_crosscoder_global_batch_must_split_over_the_ranks(monkeypatch):
    monkeypatch.setattr(trainer_module, "dist_info", lambda: DistInfo(rank=0, world_size=3))
    acts = torch.randn(256, 2, 8)
    with pytest.raises(CrossdiffError, match="batch_size=128 does not split evenly over 3"):
        train_crosscoder(acts, CrossCoderConfig(d_model=8, d_sae=16, k=2), steps=2, batch_size=128)
