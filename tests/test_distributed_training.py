"""Data-parallel language-model training under torchrun (2 CPU processes, gloo): the loss curve
follows the single-process run with the same global batch, and a checkpoint written by 2 ranks
resumes in 1 process."""

from pathlib import Path

import pytest
import torch
from launcher import launch
from test_models_train import markov_token_set

from crossdiff.models import load_model
from crossdiff.models.io import read_model_header

# float32 sums in another order; an MoE's top-k routing can amplify them a little
TOLERANCE = {"dense": 1e-4, "moe": 1e-3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-data")
    markov_token_set(24, seed=0).save(folder / "train.safetensors")
    markov_token_set(4, seed=1).save(folder / "heldout.safetensors")
    return folder


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-1proc")
    launch("train_lm.py", data_dir, out, 8, nproc=1)
    return out


def curve(out: Path, name: str) -> torch.Tensor:
    return torch.tensor(read_model_header(out / name)["training"]["loss_curve"])


@pytest.mark.slow  # about 15 s with its fixtures
def test_two_rank_loss_curve_matches_one_process_with_the_same_global_batch(
    data_dir, single_run, tmp_path
):
    launch("train_lm.py", data_dir, tmp_path, 8, nproc=2)
    for name in ("dense", "moe"):
        one, two = curve(single_run, name), curve(tmp_path, name)
        assert one.shape == two.shape == (8, 2)
        torch.testing.assert_close(two[:, 1], one[:, 1], atol=1e-5, rtol=0)  # aux: global too
        assert one[-1, 0] < one[0, 0] - 0.1  # it is learning, so the comparison means something
        # cross-entropy: the same global batch and averaged gradients give the same run
        torch.testing.assert_close(two[:, 0], one[:, 0], atol=TOLERANCE[name], rtol=0)
    tokens = markov_token_set(2, seed=5).tokens
    # dense weights agree closely; an MoE's top-k routing can flip on tiny differences, so its
    # logits are not compared token by token
    torch.testing.assert_close(
        load_model(tmp_path / "dense")(tokens),
        load_model(single_run / "dense")(tokens),
        atol=1e-3,
        rtol=0,
    )


@pytest.mark.slow  # about 13 s
def test_checkpoint_of_two_ranks_resumes_in_one_process(data_dir, single_run, tmp_path):
    crashed = launch(
        "train_lm.py", data_dir, tmp_path, 8, nproc=2,
        env={"CHECKPOINT_EVERY": "3", "STOP_AFTER_STEPS": "13"}, check=False,
    )  # fmt: skip
    assert crashed.returncode != 0
    # dense finished (8 steps) before the crash in the MoE's step 6; its checkpoint is at step 3
    assert (tmp_path / "dense" / "config.json").exists()
    assert (tmp_path / "checkpoints" / "moe" / "checkpoint.safetensors").exists()
    resumed = launch("train_lm.py", data_dir, tmp_path, 8, nproc=1, env={"CHECKPOINT_EVERY": "3"})
    assert "moe: resuming from the checkpoint at step 3" in resumed.stdout
    assert "dense: " in resumed.stdout and "skipping training" in resumed.stdout
    torch.testing.assert_close(
        curve(tmp_path, "moe")[:, 0], curve(single_run, "moe")[:, 0], atol=TOLERANCE["moe"], rtol=0
    )
