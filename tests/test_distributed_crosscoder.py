"""Data-parallel crosscoder training under torchrun (2 CPU processes, gloo): both ranks end with
identical weights, threshold and dead-latent counters, equal to one process's run with the same
global batch; a checkpoint written by 2 ranks resumes in 1 process."""

import json
from pathlib import Path

import pytest
import torch
from launcher import launch
from safetensors.torch import load_file

STEPS = 40


def result(out: Path, rank: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = load_file(out / f"rank_{rank}.safetensors")
    return tensors, json.loads((out / f"rank_{rank}.json").read_text())["history"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("cc-1proc")
    launch("train_crosscoder.py", out, STEPS, nproc=1)
    return result(out, 0)


@pytest.mark.slow  # 10-17 s with the single fixture
def test_two_ranks_agree_and_follow_the_single_process_run(single, tmp_path):
    launch("train_crosscoder.py", tmp_path, STEPS, nproc=2)
    (rank0, curve0), (rank1, _) = result(tmp_path, 0), result(tmp_path, 1)
    assert set(rank0) == set(rank1) == set(single[0])
    for key in rank0:  # not a gradient: threshold, dead counters, firing counts, scaling too
        assert torch.equal(rank0[key], rank1[key]), key
    assert float(rank0["threshold"]) > 0 and float(rank0["dead_counters"].max()) > 0
    for key, value in single[0].items():
        torch.testing.assert_close(rank0[key], value, atol=1e-5, rtol=1e-4, msg=key)
    mse_one = torch.tensor([row["mse"] for row in single[1]])
    mse_two = torch.tensor([row["mse"] for row in curve0])
    assert len(mse_two) == STEPS and mse_one[-1] < 0.7 * mse_one[0]  # it learns
    torch.testing.assert_close(mse_two, mse_one, atol=1e-4, rtol=1e-5)
    assert [row["dead"] for row in curve0] == [row["dead"] for row in single[1]]


@pytest.mark.slow  # about 15 s
def test_checkpoint_of_two_ranks_resumes_in_one_process(single, tmp_path):
    ckpt = tmp_path / "ckpt"
    crashed = launch(
        "train_crosscoder.py", tmp_path / "crashed", STEPS, ckpt, nproc=2,
        env={"STOP_AFTER_STEPS": "25"}, check=False,
    )  # fmt: skip
    assert crashed.returncode != 0
    assert json.loads((ckpt / "state.json").read_text())["steps_done"] == 20
    resumed = launch("train_crosscoder.py", tmp_path / "resumed", STEPS, ckpt, nproc=1)
    assert "resuming from" in resumed.stdout and "at step 20/40" in resumed.stdout
    tensors, _ = result(tmp_path / "resumed", 0)
    for key, value in single[0].items():
        torch.testing.assert_close(tensors[key], value, atol=1e-5, rtol=1e-4, msg=key)
