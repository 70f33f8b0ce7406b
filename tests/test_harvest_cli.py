"""`crossdiff harvest` on a run folder of saved crossdiff models."""

from __future__ import annotations

import argparse

import pytest
import torch

from crossdiff.activations import ActivationStore
from crossdiff.activations.commands import register
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError

models = pytest.importorskip("crossdiff.models")
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
SMALL = dict(n_layers=3, d_model=16, d_head=8, n_heads=2, d_mlp=24, d_vocab=40, n_ctx=16)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    models.save_model(
        models.build_model(models.dense_config("tiny", **SMALL)), tmp_path / "models" / "dense"
    )
    models.save_model(
        models.build_model(models.moe_config("tiny", **SMALL)), tmp_path / "models" / "moe"
    )
    tokens = torch.randint(1, 40, (6, 9))
    tokens[:, 0] = 0
    TokenSet(
        tokens=tokens,
        doc_ids=torch.arange(6).unsqueeze(1).expand(6, 9).clone(),
        doc_positions=(torch.arange(9) - 1).expand(6, 9).clone(),
        domains=torch.tensor([0, 0, 1, 1, 2, 2]),
    ).save(tmp_path / "data" / "tokens_train.safetensors")
    return tmp_path


def test_cli_harvests_from_a_run_folder(run_dir, capsys):
    m = run_dir / "models"
    out = run_dir / "store"
    argv = ["harvest", "--models", str(m / "dense"), str(m / "moe"), "--pairing", "paper"]
    args = parse(
        [*argv, "--tokens", "30", "--out", str(out), "--batch-size", "4", "--device", "cpu"]
    )
    assert args.func(args) == 0
    store = ActivationStore(out)
    assert store.n_tokens == 30 and store.model_names == ["dense", "moe"]
    assert store.manifest["experts"]["model"] == "moe"
    assert (store.read_metadata()["experts"] >= 0).all()
    assert f"to {out}" in capsys.readouterr().out
    # running the same command again extends, never duplicates
    args = parse([*argv, "--tokens", "40", "--out", str(out), "--device", "cpu"])
    assert args.func(args) == 0 and ActivationStore(out).n_tokens == 40


def test_cli_without_token_set_outside_a_run_folder_asks_for_one(run_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("loose")
    models.save_model(models.build_model(models.dense_config("tiny", **SMALL)), elsewhere / "a")
    args = parse(
        [
            "harvest",
            "--models",
            str(elsewhere / "a"),
            str(elsewhere / "a"),
            "--out",
            str(elsewhere / "s"),
        ]
    )
    with pytest.raises(CrossdiffError, match="--token-set"):
        args.func(args)
