"""Harvesting by several processes (torch.distributed, gloo on CPU) into one store: the merged
store equals the single-process harvest token for token, a killed or failing rank resumes, and a
resume with another number of processes is refused.

Most tests fork the ranks from the test process (they share its imported modules and its models,
so a launch takes a second); one test runs the real `torchrun -m crossdiff harvest`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import multiprocessing
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from launcher import launch_module
from test_harvest import tiny_pair, tiny_token_set

import crossdiff.activations.store_writer as writer_module
from crossdiff.activations import ActivationStore, harvest
from crossdiff.activations.harvest_ranks import partition_rows
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import finish_distributed, init_distributed

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
# the module (`crossdiff.activations.harvest` is the function, re-exported by the package)
sharded_module = importlib.import_module("crossdiff.activations.harvest_ranks")
KW = dict(batch_size=3, shard_tokens=10, progress=False)  # 10 rows of 8 tokens: 4 batches


# --- launching ranks ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job: Callable, logs: Path) -> None:
    """A forked rank: join the gloo group the way torchrun's variables describe, run the job."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    code = 0
    with open(logs / f"rank_{rank}.log", "w") as log, contextlib.redirect_stdout(log):
        try:
            init_distributed()
            job(rank)
        except BaseException as err:  # reported to the test through the log
            print(f"ERROR {type(err).__name__}: {err}")
            traceback.print_exc(file=log)
            code = 1
        finally:
            with contextlib.suppress(Exception):
                finish_distributed()
    os._exit(code)


def run_ranks(world: int, job: Callable[[int], None], logs: Path, timeout: float = 120) -> list:
    """Run job(rank) in `world` forked processes; like torchrun, stop the others once one fails.
    Returns each rank's (exit code, log text)."""
    logs.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, logs)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs):
        failed = any(p.exitcode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.02)
    for p in procs:
        p.join()
    assert time.monotonic() <= deadline, "the ranks did not finish in time (a hang?)"
    return [(p.exitcode, (logs / f"rank_{r}.log").read_text()) for r, p in enumerate(procs)]


def assert_ok(results: list) -> None:
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{log}"


# --- what is compared --------------------------------------------------------------------------


def assert_same_store(merged: ActivationStore, single: ActivationStore) -> None:
    """Token for token the same store: activations bit-identical, metadata, segments, stats."""
    assert merged.n_tokens == single.n_tokens
    assert torch.equal(merged.read_acts(), single.read_acts())
    a, b = merged.read_metadata(), single.read_metadata()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("model_names", "models", "hook_points", "pairing", "dtype", "d_models", "experts"):
        assert merged.manifest[key] == single.manifest[key], key
    assert merged.manifest["segments"] == single.manifest["segments"]
    # the same held-out part: the same split, the same tokens in it
    assert merged.manifest["split"] == single.manifest["split"]
    assert merged.parts == single.parts
    assert torch.equal(merged.part("train").read_acts(), single.part("train").read_acts())
    torch.testing.assert_close(merged.scaling_factors, single.scaling_factors, rtol=1e-6, atol=0)
    s, t = merged.statistics(), single.statistics()
    for key in ("mean", "std", "mean_norm"):
        torch.testing.assert_close(s[key], t[key], rtol=1e-9, atol=1e-12)
    merged.verify()


def assert_every_token_once(store: ActivationStore, ts: TokenSet, n_tokens: int) -> None:
    meta = store.read_metadata()
    pairs = list(zip(meta["doc_ids"].tolist(), meta["positions"].tolist(), strict=True))
    assert len(pairs) == len(set(pairs)) == n_tokens
    # and they are the first n_tokens harvestable tokens, in order
    doc_ids, positions = ts.doc_ids[:, 1:].reshape(-1), ts.doc_positions[:, 1:].reshape(-1)
    expected = list(zip(doc_ids.tolist(), positions.tolist(), strict=True))
    assert pairs == expected[:n_tokens]


# --- the partition -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_rows,batch,world", [(10, 3, 2), (12, 3, 2), (100, 7, 3), (7, 2, 4), (5, 4, 3), (1, 32, 2)]
)
def test_partition_covers_every_row_once_on_batch_boundaries(n_rows, batch, world):
    parts = partition_rows(n_rows, batch, world)
    assert len(parts) == world
    rows = [r for lo, hi in parts for r in range(lo, hi)]
    assert rows == list(range(n_rows))  # every row once, contiguous, in rank order
    for lo, hi in parts:
        assert lo % batch == 0 or lo == n_rows
        assert hi % batch == 0 or hi == n_rows
    n_batches = [-(-(hi - lo) // batch) for lo, hi in parts]
    assert max(n_batches) - min(n_batches) <= 1  # balanced


def test_partition_with_more_processes_than_batches_leaves_some_empty():
    assert partition_rows(5, 4, 3) == [(0, 0), (0, 4), (4, 5)]
    assert partition_rows(0, 4, 2) == [(0, 0), (0, 0)]
    assert partition_rows(8, 4, 2) == [(0, 4), (4, 8)]
    with pytest.raises(CrossdiffError):
        partition_rows(8, 0, 2)


def test_distributed_true_outside_torchrun_is_refused(tmp_path):
    with pytest.raises(CrossdiffError, match="torchrun"):
        harvest(*tiny_pair(), tiny_token_set(), "paper", tmp_path / "s", distributed=True)


# --- two ranks, one store ----------------------------------------------------------------------


def test_two_ranks_harvest_one_store_equal_to_one_process(tmp_path):
    dense, moe = tiny_pair()
    ts = tiny_token_set()  # 10 rows x 8 tokens after BOS
    single = harvest(dense, moe, ts, "paper", tmp_path / "single", n_tokens=70, **KW)
    out = tmp_path / "two"

    def job(rank: int) -> None:
        harvest(dense, moe, ts, "paper", out, n_tokens=70, **KW)

    assert_ok(run_ranks(2, job, tmp_path / "logs1"))
    merged = ActivationStore(out)
    assert_same_store(merged, single)
    assert_every_token_once(merged, ts, 70)
    # 70 tokens need rows 0..8 (row 8 in part): 3 batches; rank 0 takes batch 0 (24 tokens),
    # rank 1 batches 1 and 2 (46 tokens), each in shards of 10 tokens
    assert [s["file"].rsplit("/", 1)[0] for s in merged.manifest["shards"]] == [
        "ranks-of-2/rank_0"
    ] * 3 + ["ranks-of-2/rank_1"] * 5
    assert [s["start"] for s in merged.manifest["shards"]] == [0, 10, 20, 24, 34, 44, 54, 64]
    assert merged.manifest["distributed"]["ranks"][1] == {
        "rank": 1, "rows": [3, 9], "tokens": [24, 70]
    }  # fmt: skip
    assert merged.manifest["statistics"]["file"] == "stats_00008.safetensors"
    top = sorted(p.name for p in out.iterdir())
    assert top == ["manifest.json", "ranks-of-2", "stats_00008.safetensors"]

    # the same command again: nothing to do, said once (by rank 0)
    before = (out / "manifest.json").read_text()
    results = run_ranks(2, job, tmp_path / "logs2")
    assert_ok(results)
    assert "already holds 70 tokens" in results[0][1]
    assert "already holds" not in results[1][1]
    assert (out / "manifest.json").read_text() == before

    # several processes never extend a store: a clear error on every rank
    def extend(rank: int) -> None:
        harvest(dense, moe, ts, "paper", out, n_tokens=80, **KW)

    results = run_ranks(2, extend, tmp_path / "logs3")
    for code, log in results:
        assert code == 1 and "does not extend" in log and "single-process harvest" in log
    # ... one process does, and the result is the single-process store of 80 tokens
    extended = harvest(dense, moe, ts, "paper", out, n_tokens=80, **KW)
    assert extended.manifest["shards"][-1]["file"] == "shard_00008.safetensors"
    full = harvest(dense, moe, ts, "paper", tmp_path / "single80", n_tokens=80, **KW)
    assert_same_store(extended, full)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "ranks-of-2", "shard_00008.safetensors", "stats_00009.safetensors"
    ]  # fmt: skip

    # resume=False replaces it, by several processes too
    def replace(rank: int) -> None:
        harvest(dense, moe, ts, "paper", out, n_tokens=70, resume=False, **KW)

    assert_ok(run_ranks(2, replace, tmp_path / "logs4"))
    assert_same_store(ActivationStore(out), single)
    assert not (out / "shard_00008.safetensors").exists()


def test_a_killed_rank_resumes_and_other_world_sizes_are_refused(tmp_path, monkeypatch):
    dense, moe = tiny_pair()
    ts = tiny_token_set(n_seq=12)
    kwargs = dict(KW, batch_size=2, n_tokens=90)  # 12 rows: 6 batches, 3 per rank
    single = harvest(dense, moe, ts, "paper", tmp_path / "single", **kwargs)
    out = tmp_path / "store"
    real_write = writer_module.StoreWriter.write_shard

    def job(rank: int) -> None:
        if rank == 1:  # rank 1 dies (as if killed) after its second shard
            written = []

            def write_then_die(self, tensors):
                if len(written) == 2:
                    os._exit(9)
                real_write(self, tensors)
                written.append(1)

            monkeypatch.setattr(writer_module.StoreWriter, "write_shard", write_then_die)
        harvest(dense, moe, ts, "paper", out, **kwargs)

    results = run_ranks(2, job, tmp_path / "logs1")
    assert results[1][0] == 9 and results[0][0] != 0  # rank 0 is stopped, like torchrun does
    assert not (out / "manifest.json").exists()  # nothing merged
    assert ActivationStore(out / "ranks-of-2" / "rank_1").n_tokens == 20

    # a resume with another number of processes is refused on every rank ...
    def three(rank: int) -> None:
        harvest(dense, moe, ts, "paper", out, **kwargs)

    for code, log in run_ranks(3, three, tmp_path / "logs2"):
        assert code == 1
        assert "unfinished harvest by 2 processes" in log and "same number of processes" in log
    # ... and so is one process
    with pytest.raises(CrossdiffError, match="unfinished harvest by 2 processes"):
        harvest(dense, moe, ts, "paper", out, **kwargs)

    # ... and other options
    def other_options(rank: int) -> None:
        harvest(dense, moe, ts, "paper", out, **dict(kwargs, n_tokens=80))

    for code, log in run_ranks(2, other_options, tmp_path / "logs3"):
        assert code == 1 and "re-run it with the same options" in log and "n_tokens=90" in log

    # the same command with 2 processes finishes it: the store a single run writes
    def resume(rank: int) -> None:
        harvest(dense, moe, ts, "paper", out, **kwargs)

    assert_ok(run_ranks(2, resume, tmp_path / "logs4"))
    merged = ActivationStore(out)
    assert_same_store(merged, single)
    assert_every_token_once(merged, ts, 90)
    # each rank's own store is the one an uninterrupted run writes (byte-identical shards)
    fresh = tmp_path / "fresh"
    assert_ok(run_ranks(2, lambda rank: harvest(dense, moe, ts, "paper", fresh, **kwargs),
                        tmp_path / "logs5"))  # fmt: skip
    checksums = [s["sha256"] for s in merged.manifest["shards"]]
    assert checksums == [s["sha256"] for s in ActivationStore(fresh).manifest["shards"]]


def test_a_failing_rank_fails_every_rank_and_the_rerun_resumes(tmp_path, monkeypatch):
    dense, moe = tiny_pair()
    ts = tiny_token_set()
    single = harvest(dense, moe, ts, "paper", tmp_path / "single", **KW)
    out = tmp_path / "store"
    real_bytes = writer_module._write_bytes

    def job(rank: int) -> None:
        if rank == 0:  # rank 0's disk fills up at its third shard
            calls = []

            def disk_fills_up(path, data):
                calls.append(path)
                if len(calls) == 5:
                    raise OSError(errno.ENOSPC, "No space left on device")
                real_bytes(path, data)

            monkeypatch.setattr(writer_module, "_write_bytes", disk_fills_up)
        harvest(dense, moe, ts, "paper", out, **KW)

    results = run_ranks(2, job, tmp_path / "logs1")
    assert results[0][0] == 1 and "disk is full" in results[0][1]
    assert results[1][0] == 1 and "rank 0 failed while harvesting" in results[1][1]
    assert ActivationStore(out / "ranks-of-2" / "rank_1").n_tokens == 32  # rank 1 finished
    assert ActivationStore(out / "ranks-of-2" / "rank_0").n_tokens == 20

    assert_ok(run_ranks(2, lambda rank: harvest(dense, moe, ts, "paper", out, **KW),
                        tmp_path / "logs2"))  # fmt: skip
    assert_same_store(ActivationStore(out), single)


def test_a_merge_that_dies_before_its_manifest_is_done_again(tmp_path, monkeypatch):
    dense, moe = tiny_pair()
    ts = tiny_token_set()
    single = harvest(dense, moe, ts, "paper", tmp_path / "single", **KW)
    out = tmp_path / "store"
    real_json = sharded_module.write_json_atomic

    def job(rank: int) -> None:
        def power_cut_at_the_manifest(path, obj):
            if Path(path) == out / "manifest.json":
                raise RuntimeError("power cut")
            return real_json(path, obj)

        monkeypatch.setattr(sharded_module, "write_json_atomic", power_cut_at_the_manifest)
        harvest(dense, moe, ts, "paper", out, **KW)

    results = run_ranks(2, job, tmp_path / "logs1")
    assert "power cut" in results[0][1] and "rank 0 failed while merging" in results[1][1]
    assert not (out / "manifest.json").exists()
    assert (out / "stats_00009.safetensors").exists()  # the merged statistics, now an orphan

    assert_ok(run_ranks(2, lambda rank: harvest(dense, moe, ts, "paper", out, **KW),
                        tmp_path / "logs2"))  # fmt: skip
    assert_same_store(ActivationStore(out), single)
    # one process with resume=False replaces the whole store, rank folders included
    replaced = harvest(dense, moe, ts, "paper", out, resume=False, **KW)
    assert sorted(p.name for p in out.iterdir())[:2] == ["manifest.json", "shard_00000.safetensors"]
    assert not (out / "ranks-of-2").exists()
    assert_same_store(replaced, single)


def test_more_processes_than_batches(tmp_path):
    dense, moe = tiny_pair()
    ts = tiny_token_set(n_seq=4)
    kwargs = dict(KW, batch_size=3)  # 2 batches for 3 processes
    single = harvest(dense, moe, ts, "paper", tmp_path / "single", **kwargs)
    out = tmp_path / "store"
    assert_ok(run_ranks(3, lambda rank: harvest(dense, moe, ts, "paper", out, **kwargs),
                        tmp_path / "logs"))  # fmt: skip
    merged = ActivationStore(out)
    assert_same_store(merged, single)
    assert [r["rows"] for r in merged.manifest["distributed"]["ranks"]] == [[0, 0], [0, 3], [3, 4]]
    assert sorted(p.name for p in (out / "ranks-of-3").iterdir()) == [
        "plan.json", "rank_1", "rank_2"
    ]  # fmt: skip


# --- the command line under torchrun -----------------------------------------------------------


@pytest.mark.slow  # about 10 s
def test_torchrun_crossdiff_harvest_writes_the_single_process_store(tmp_path):
    models = pytest.importorskip("crossdiff.models")
    small = dict(n_layers=3, d_model=16, d_head=8, n_heads=2, d_mlp=24, d_vocab=40, n_ctx=16)
    torch.manual_seed(0)
    for name, config in (("dense", models.dense_config), ("moe", models.moe_config)):
        models.save_model(models.build_model(config("tiny", **small)), tmp_path / "models" / name)
    ts = tiny_token_set(n_seq=8)
    ts.save(tmp_path / "tokens.safetensors")
    argv = [
        "harvest", "--models", str(tmp_path / "models" / "dense"), str(tmp_path / "models" / "moe"),
        "--token-set", str(tmp_path / "tokens.safetensors"), "--tokens", "60",
        "--batch-size", "2", "--device", "cpu",
    ]  # fmt: skip
    result = launch_module(*argv, "--out", tmp_path / "two", nproc=2, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("by 2 processes to") == 1  # rank 0's summary only

    dense = models.load_model(tmp_path / "models" / "dense")
    moe = models.load_model(tmp_path / "models" / "moe")
    single = harvest(
        dense, moe, ts, "paper", tmp_path / "one", n_tokens=60, batch_size=2, progress=False,
        model_names=("dense", "moe"),  # the command's default names
    )  # fmt: skip
    merged = ActivationStore(tmp_path / "two")
    assert_same_store(merged, single)
    assert_every_token_once(merged, ts, 60)
    plan = json.loads((tmp_path / "two" / "ranks-of-2" / "plan.json").read_text())
    assert [r["rows"] for r in plan["ranks"]] == [[0, 4], [4, 8]]
