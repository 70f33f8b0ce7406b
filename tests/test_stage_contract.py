"""One contract per stage: each stage has one config (built from a preset's options, unknown
names refused) and one `run`, and the stage subcommands and `crossdiff run` call that `run`, so
at the same preset they write the same stage folders, file by file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossdiff.activations.stage import StoreStageConfig
from crossdiff.crosscoder.stage import CrosscoderStageConfig
from crossdiff.data.stage import DataStageConfig
from crossdiff.models.stage import ModelsStageConfig
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.presets import RUN_PRESETS
from crossdiff.report.stage import ReportStageConfig

CONFIGS = {
    "data": DataStageConfig,
    "models": ModelsStageConfig,
    "store": StoreStageConfig,
    "crosscoder": CrosscoderStageConfig,
    "report": ReportStageConfig,
}

# Files a stage writes that legitimately differ between the two paths: the run's stage records
# (the subcommands write none) and the crosscoder checkpoints (train-crosscoder keeps its older
# OUT/checkpoint, the run OUT/checkpoints; neither is a stage output).
SKIPPED_FILES = ("stage.json", ".stage.pending.json", "checkpoint", "checkpoints")
# JSON fields that legitimately differ: wall-clock timings and rates, dates, absolute paths and
# the runtime options a subcommand records next to the stage's (training.json "options").
IGNORED_FIELDS = {
    "seconds", "elapsed_seconds", "tokens_per_second", "created", "created_at", "timestamp",
    "time", "wall_seconds", "path", "dir", "store", "dataset_path", "out", "device",
    "steps_per_second", "started", "finished",
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(RUN_PRESETS))
def test_every_preset_builds_every_stage_config(preset):
    for stage, config in CONFIGS.items():
        options = {k: v for k, v in RUN_PRESETS[preset][stage].items()}
        assert stage == config.from_options(options).STAGE


def test_an_unknown_option_is_refused_with_the_known_ones():
    with pytest.raises(CrossdiffError, match=r"crosscoder: unknown option\(s\) \['kk'\]"):
        CrosscoderStageConfig.from_options({"kk": 3})
    with pytest.raises(CrossdiffError, match="pairing"):
        StoreStageConfig.from_options({"n_token": 3})


def _clean(value, key=None):
    if isinstance(value, dict):
        return {k: _clean(v, k) for k, v in value.items() if k not in IGNORED_FIELDS}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return "<path>"
    if isinstance(value, float) and key and ("second" in key or "time" in key):
        return "<time>"
    return value


def _files(folder: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(folder)): p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not set(p.relative_to(folder).parts) & set(SKIPPED_FILES)
        and not p.name.endswith(".lock")
    }


def assert_same_folder(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b), (a, b)
    for name, path_a in files_a.items():
        path_b = files_b[name]
        if name.endswith(".safetensors"):
            ta, tb = load_file(path_a), load_file(path_b)
            assert sorted(ta) == sorted(tb), name
            for key in ta:
                assert torch.equal(ta[key], tb[key]), f"{name}: tensor {key} differs"
        elif name.endswith(".json"):
            ja, jb = (_clean(json.loads(p.read_text())) for p in (path_a, path_b))
            assert ja == jb, f"{name} differs"


@pytest.mark.slow
def test_the_subcommands_and_run_write_identical_stage_folders_at_micro(tmp_path, monkeypatch):
    from crossdiff.cli import main

    torch.set_num_threads(1)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    run, cli = tmp_path / "run", tmp_path / "cli"
    common = ["--preset", "micro", "--device", "cpu"]
    assert main(["run", *common, "--out", str(run), "--splice-sequences", "0",
                 "--activations", "store"]) == 0  # fmt: skip
    assert main(["prepare-data", *common, "--out", str(cli / "data")]) == 0
    assert main(["train-models", *common, "--out", str(cli)]) == 0
    models = [str(cli / "models" / name) for name in ("dense", "moe")]
    assert main(["harvest", *common, "--models", *models, "--out", str(cli / "store")]) == 0
    assert main(["train-crosscoder", *common, "--store", str(cli / "store"),
                 "--out", str(cli / "crosscoder")]) == 0  # fmt: skip
    assert (
        main(
            [
                "report",
                *common,
                "--crosscoder",
                str(cli / "crosscoder"),
                "--store",
                str(cli / "store"),
                "--splice-sequences",
                "0",
                "--out",
                str(cli / "report"),
            ]
        )
        == 0
    )
    for stage in ("data", "models", "store", "crosscoder"):
        assert_same_folder(run / stage, cli / stage)
    # the report: its data (report.json); its pages and figures render the same data
    report_a, report_b = (
        json.loads((r / "report" / "report.json").read_text()) for r in (run, cli)
    )
    assert _clean(report_a) == _clean(report_b)
