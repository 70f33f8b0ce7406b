"""`crossdiff train-models`: wiring from the command line to prepare_data and the trainer."""

import json
from types import SimpleNamespace

from test_models_train import FakeTokenizer, markov_token_set

import crossdiff.data
from crossdiff.cli import main


def test_train_models_prepares_data_and_writes_both_models(tmp_path, monkeypatch, capsys):
    calls = {}

    def fake_prepare_data(out_dir, *, source=None, preset="tiny", seed=0, **options):
        calls.update(out_dir=out_dir, source=source, preset=preset, seed=seed)
        return SimpleNamespace(
            tokenizer=FakeTokenizer(),
            train=markov_token_set(4, seed=0),
            heldout=markov_token_set(2, seed=1),
            paths={},
        )

    monkeypatch.setattr(crossdiff.data, "prepare_data", fake_prepare_data)
    argv = ["train-models", "--out", str(tmp_path), "--steps", "2", "--batch-size", "2"]
    argv += ["--no-parallel", "--device", "cpu", "--seed", "3", "--corpus", "embedded"]
    assert main(argv) == 0
    assert calls == dict(out_dir=tmp_path / "data", source="embedded", preset="tiny", seed=3)
    models = tmp_path / "models"
    for name in ("dense", "moe"):
        header = json.loads((models / name / "config.json").read_text())
        assert header["config"]["d_vocab"] == FakeTokenizer.vocab_size  # from the tokenizer
        assert header["training"]["settings"]["options"]["steps"] == 2
    assert (models / "tokenizer" / "tokenizer.json").exists()
    report = json.loads((models / "eval.json").read_text())
    assert set(report["models"]) == {"dense", "moe"}
    out = capsys.readouterr().out
    assert "held-out cross-entropy" in out and "expert load" in out


def test_unknown_preset_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(crossdiff.data, "prepare_data", lambda *a, **k: 1 / 0)
    assert main(["train-models", "--out", str(tmp_path), "--preset", "large"]) == 2
    assert "unknown model preset 'large'" in capsys.readouterr().err
