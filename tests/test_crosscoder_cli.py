"""`crossdiff train-crosscoder` on a store (an in-memory stand-in for ActivationStore)."""

import argparse
import json

import torch

import crossdiff.crosscoder.commands as commands
from crossdiff.crosscoder import CrossCoder
from crossdiff.crosscoder.synthetic import InMemoryStore, planted_crosscoder_data


def parse(argv):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_train_crosscoder_command_writes_the_crosscoder_and_training_json(
    tmp_path, monkeypatch, capsys
):
    torch.set_num_threads(1)
    acts, _ = planted_crosscoder_data(2048, 8, 6, 3, 3, densities=(0.1, 0.3), seed=0)
    store = InMemoryStore(acts, model_names=("dense", "moe"))
    monkeypatch.setattr(commands, "_open_store", lambda path: store)
    out = tmp_path / "cc"
    argv = [
        "train-crosscoder",
        "--store",
        str(tmp_path),
        "--out",
        str(out),
        "--d-sae",
        "32",
        "--k",
        "2",
        "--steps",
        "60",
        "--batch-size",
        "128",
        "--lr",
        "3e-3",
        "--checkpoint-every",
        "20",
        "--device",
        "cpu",
    ]
    args = parse(argv)
    assert args.func(args) == 0
    assert (out / "cfg.json").exists() and (out / "checkpoint" / "state.json").exists()
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["d_sae"] == 32 and record["options"]["steps"] == 60
    assert record["config"]["metadata"]["model_names"] == ["dense", "moe"]
    assert set(record["metrics"]) >= {"fve", "fve_per_model", "l0", "l0_topk", "dead_fraction"}
    assert record["metrics"]["fve"] > 0.5
    assert "tokens_per_second" in record["training"]
    printed = capsys.readouterr().out
    assert "FVE" in printed and "training.json" in printed

    cc = CrossCoder.load(out)
    x = acts[:64]
    torch.testing.assert_close(cc(x), cc(x))
    args = parse(argv)
    assert args.func(args) == 0
    assert "already trained" in capsys.readouterr().out


def test_expansion_sets_d_sae(tmp_path, monkeypatch):
    acts, _ = planted_crosscoder_data(512, 8, 6, 3, 3, densities=(0.1, 0.3), seed=0)
    monkeypatch.setattr(commands, "_open_store", lambda path: InMemoryStore(acts))
    args = parse(
        [
            "train-crosscoder",
            "--store",
            "s",
            "--out",
            str(tmp_path / "o"),
            "--expansion",
            "3",
            "--k",
            "2",
            "--steps",
            "2",
            "--batch-size",
            "64",
        ]
    )
    assert args.func(args) == 0
    assert CrossCoder.load(tmp_path / "o").cfg.d_sae == 24
