"""`crossdiff run` under torchrun (2 CPU processes): every stage runs data-parallel, rank 0 writes
the stage records and the report, and a rerun skips every stage."""

import json

import pytest
import torch
from launcher import launch_module

from crossdiff.activations import ActivationStore
from crossdiff.models.io import read_model_header

ARGS = ("--preset", "micro", "--lm-steps", "6", "--crosscoder-steps", "20")
ARGS += ("--harvest-tokens", "8000", "--device", "cpu")


@pytest.mark.slow  # about 45 s: a micro run under torchrun
def test_run_under_torchrun_completes_every_stage_once(tmp_path):
    out = tmp_path / "run"
    first = launch_module("run", "--out", out, *ARGS, nproc=2)
    for stage in ("data", "models", "store", "crosscoder"):
        record = json.loads((out / stage / "stage.json").read_text())
        assert record["options"]["seed"] == 0
        assert first.stdout.count(f"[crossdiff] {stage}: running into") == 1  # rank 0 speaks
    for name in ("dense", "moe"):
        assert len(read_model_header(out / "models" / name)["training"]["loss_curve"]) == 6
    store = ActivationStore(out / "store")
    meta = store.read_metadata()
    pairs = torch.stack([meta["doc_ids"], meta["positions"]], dim=1)
    assert store.n_tokens == 8000 and len(pairs.unique(dim=0)) == 8000
    assert store.manifest["distributed"]["world_size"] == 2
    report = json.loads((out / "report" / "report.json").read_text())
    summary = report["summary"]
    assert sum(summary["class_counts"].values()) == summary["d_sae"] and summary["n_tokens"] > 0
    assert first.stdout.count("=== crossdiff run summary ===") == 1

    again = launch_module("run", "--out", out, *ARGS, nproc=2)
    for stage in ("data", "models", "store", "crosscoder"):
        assert again.stdout.count(f"[crossdiff] {stage}: already done") == 1
