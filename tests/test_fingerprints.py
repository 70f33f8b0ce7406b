"""Stale results and configuration (issue 13): fingerprinted stages and checkpoints, options
checked before anything runs, run.json written only for accepted options, and folder locks.

Each reproduction a reviewer filed is a test here; each fails on the code before fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossdiff.crosscoder.commands as commands
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig, train_crosscoder
from crossdiff.crosscoder.synthetic import InMemoryStore, planted_crosscoder_data
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.fingerprint import describe_changes, folder_fingerprint, store_fingerprint
from crossdiff.plumbing.lock import acquire, folder_lock, release
from crossdiff.run import stage_record
from crossdiff.run.pipeline import run_pipeline
from crossdiff.run.validation import crosscoder_memory_bytes


def record(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "stage.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return CrossCoder.load(folder).state_dict()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished micro run (about a minute: the language models are most of it)."""
    out = tmp_path_factory.mktemp("fingerprints") / "run"
    run_pipeline(out, "micro", device="cpu")
    return out


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


@pytest.mark.slow  # pays for base_run, a whole micro run (over 2 min on the loaded 2-core machine)
def test_records_hold_options_inputs_and_output_fingerprints(base_run: Path):
    records = {s: record(base_run, s) for s in ("data", "models", "store", "crosscoder", "report")}
    assert records["models"]["inputs"] == {"data": records["data"]["output"]}
    assert records["store"]["inputs"] == {
        "data": records["data"]["output"],
        "models": records["models"]["output"],
    }
    assert records["crosscoder"]["inputs"] == {"store": records["store"]["output"]}
    assert records["crosscoder"]["options"]["k"] == 8
    assert len({r["output"] for r in records.values()}) == 5
    # crosscoder checkpoints live inside the stage folder, none outside it
    assert (base_run / "crosscoder" / "checkpoints" / "state.json").exists()
    assert not (base_run / "crosscoder_checkpoints").exists()
    assert not list(base_run.glob("*/.stage.pending.json")) and not (base_run / "run.lock").exists()


@pytest.mark.slow  # shares base_run, a whole micro run
def test_changed_store_option_redoes_store_and_after_it(run_copy: Path, capsys):
    """Reproduction 2: delete store/, re-run with another pairing; the old crosscoder was kept
    and applied to the new store (FVE dense -0.31, exit 0)."""
    old_cc = record(run_copy, "crosscoder")
    shutil.rmtree(run_copy / "store")
    summary = run_pipeline(
        run_copy, "micro", overrides={"store": {"pairing": "single-layer"}}, device="cpu"
    )
    assert summary.skipped == ["data", "models"]
    manifest = json.loads((run_copy / "store" / "manifest.json").read_text())
    assert manifest["pairing"]["name"] == "single-layer"
    new_cc = record(run_copy, "crosscoder")
    assert new_cc["inputs"] == {"store": record(run_copy, "store")["output"]}
    assert new_cc["key"] != old_cc["key"]
    report = json.loads((run_copy / "report" / "report.json").read_text())
    fve = report["summary"]["reconstruction"]["fve_per_model"]
    assert min(fve.values()) > 0.3, fve  # the old crosscoder on the new store gave -0.31
    assert "continuing in" not in capsys.readouterr().out


@pytest.mark.slow  # shares base_run, a whole micro run
def test_changed_harvest_tokens_redo_store_crosscoder_and_report(run_copy: Path, capsys):
    before = weights(run_copy / "crosscoder")
    report_mtime = (run_copy / "report" / "report.json").stat().st_mtime_ns
    summary = run_pipeline(
        run_copy, "micro", overrides={"store": {"n_tokens": 9_000}}, device="cpu"
    )
    printed = capsys.readouterr().out
    assert summary.skipped == ["data", "models"]
    assert "n_tokens: 12000 -> 9000" in printed
    assert "redoing store, crosscoder, report" in printed
    assert json.loads((run_copy / "store" / "manifest.json").read_text())["n_tokens"] == 9_000
    after = weights(run_copy / "crosscoder")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (run_copy / "report" / "report.json").stat().st_mtime_ns > report_mtime


@pytest.mark.slow  # shares base_run, a whole micro run
def test_changed_k_redoes_the_crosscoder_and_never_resumes_its_checkpoint(run_copy: Path, capsys):
    """Reproduction 1 (run): with --k 16 the k = 8 checkpoint was resumed 'at step 60/60'."""
    old = record(run_copy, "crosscoder")
    # leave the crosscoder as a kill -9 leaves it: checkpoint and pending record, no stage.json
    for name in ("stage.json", "cfg.json", "sae_weights.safetensors"):
        (run_copy / "crosscoder" / name).unlink()
    stage_record.write_pending(run_copy / "crosscoder", old["options"], old["inputs"], old["key"])
    summary = run_pipeline(run_copy, "micro", overrides={"crosscoder": {"k": 16}}, device="cpu")
    printed = capsys.readouterr().out
    assert summary.skipped == ["data", "models", "store"]
    assert "k: 8 -> 16" in printed and "resuming from" not in printed
    cfg = json.loads((run_copy / "crosscoder" / "cfg.json").read_text())
    assert cfg["k"] == 16
    assert cfg["metadata"]["crossdiff_training"]["resumed_from_step"] == 0
    state = json.loads((run_copy / "crosscoder" / "checkpoints" / "state.json").read_text())
    assert state["identity"]["config"]["k"] == 16


@pytest.mark.slow  # shares base_run, a whole micro run
def test_changed_crosscoder_option_redoes_the_finished_crosscoder_and_report(run_copy, capsys):
    report_before = (run_copy / "report" / "report.json").read_bytes()
    summary = run_pipeline(run_copy, "micro", overrides={"crosscoder": {"k": 4}}, device="cpu")
    printed = capsys.readouterr().out
    assert summary.skipped == ["data", "models", "store"]
    assert "the finished stage" in printed and "redoing crosscoder, report" in printed
    assert json.loads((run_copy / "crosscoder" / "cfg.json").read_text())["k"] == 4
    assert (
        record(run_copy, "report")["inputs"]["crosscoder"]
        == record(run_copy, "crosscoder")["output"]
    )
    assert (run_copy / "report" / "report.json").read_bytes() != report_before


@pytest.mark.slow  # shares base_run, a whole micro run
def test_unfinished_crosscoder_with_the_same_options_resumes(run_copy: Path, capsys):
    old = record(run_copy, "crosscoder")
    before = weights(run_copy / "crosscoder")
    for name in ("stage.json", "cfg.json", "sae_weights.safetensors"):
        (run_copy / "crosscoder" / name).unlink()
    stage_record.write_pending(run_copy / "crosscoder", old["options"], old["inputs"], old["key"])
    run_pipeline(run_copy, "micro", device="cpu", stop_after="crosscoder")
    printed = capsys.readouterr().out
    assert "resuming the unfinished stage" in printed and "at step 60/60" in printed
    after = weights(run_copy / "crosscoder")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert record(run_copy, "crosscoder")["key"] == old["key"]
    assert not (run_copy / "crosscoder" / ".stage.pending.json").exists()


@pytest.mark.slow  # shares base_run, a whole micro run
def test_records_of_an_older_crossdiff_are_adopted_when_their_options_match(run_copy, capsys):
    for stage in ("data", "models", "store", "crosscoder"):
        old = record(run_copy, stage)
        legacy = {"options": old["options"], "seconds": old["seconds"]}
        (run_copy / stage / "stage.json").write_text(json.dumps(legacy))
    summary = run_pipeline(run_copy, "micro", device="cpu", stop_after="crosscoder")
    assert summary.skipped == ["data", "models", "store", "crosscoder"]
    assert capsys.readouterr().out.count("by an older crossdiff with these options") == 4
    store_output = record(run_copy, "store")["output"]
    assert record(run_copy, "crosscoder")["inputs"] == {"store": store_output}


@pytest.mark.slow  # shares base_run, a whole micro run
def test_an_older_record_is_not_adopted_after_its_input_was_made_anew(run_copy, capsys):
    """Reproduction 2 on a run of an older crossdiff: its crosscoder record cannot say which
    store it was trained on, so a re-harvested store redoes it."""
    old = record(run_copy, "crosscoder")
    (run_copy / "crosscoder" / "stage.json").write_text(json.dumps({"options": old["options"]}))
    shutil.rmtree(run_copy / "store")
    summary = run_pipeline(
        run_copy, "micro", overrides={"store": {"pairing": "single-layer"}}, device="cpu"
    )
    assert summary.skipped == ["data", "models"]
    assert "predates fingerprints" in capsys.readouterr().out
    report = json.loads((run_copy / "report" / "report.json").read_text())
    assert min(report["summary"]["reconstruction"]["fve_per_model"].values()) > 0.3


@pytest.mark.slow  # shares base_run, a whole micro run
def test_changed_report_option_redoes_only_the_report(run_copy: Path):
    summary = run_pipeline(
        run_copy, "micro", overrides={"report": {"max_tokens": 6_000}}, device="cpu"
    )
    assert summary.skipped == ["data", "models", "store", "crosscoder"]
    assert record(run_copy, "report")["options"]["max_tokens"] == 6_000
    report = json.loads((run_copy / "report" / "report.json").read_text())
    assert report["summary"]["n_tokens"] <= 6_000


@pytest.mark.slow
def test_changed_models_option_redoes_models_and_after(run_copy: Path, capsys):
    old_store = record(run_copy, "store")
    summary = run_pipeline(
        run_copy, "micro", overrides={"models": {"steps": 20}}, device="cpu", stop_after="store"
    )
    printed = capsys.readouterr().out
    assert summary.skipped == ["data"]
    assert "steps: 30 -> 20" in printed and "redoing models, store, crosscoder, report" in printed
    assert record(run_copy, "store")["output"] != old_store["output"]
    # the stale crosscoder and report went with the invalidated models
    assert not (run_copy / "crosscoder").exists() and not (run_copy / "report").exists()


@pytest.mark.slow
def test_changed_data_option_redoes_every_stage(run_copy: Path, capsys):
    overrides = {"data": {"n_chars_per_domain": 120_000}}
    summary = run_pipeline(
        run_copy, "micro", overrides=overrides, device="cpu", stop_after="models"
    )
    printed = capsys.readouterr().out
    assert summary.skipped == []
    assert "n_chars_per_domain: 150000 -> 120000" in printed
    assert record(run_copy, "models")["inputs"] == {"data": record(run_copy, "data")["output"]}


def test_bad_crosscoder_options_are_refused_before_any_stage(tmp_path: Path):
    out = tmp_path / "run"
    with pytest.raises(CrossdiffError) as err:
        run_pipeline(
            out,
            "micro",
            overrides={"crosscoder": {"k": 0, "steps": 0}, "store": {"pairing": "nope"}},
            device="cpu",
        )
    message = str(err.value)
    assert "before any stage ran" in message
    assert "k=0" in message and "crosscoder: steps=0" in message and "nope" in message
    assert not out.exists()  # nothing created


def test_a_crosscoder_too_big_for_memory_is_refused_with_the_figure(tmp_path: Path):
    out = tmp_path / "run"
    with pytest.raises(CrossdiffError, match=r"needs about [\d.]+ GiB .* GiB is free on cpu"):
        run_pipeline(out, "micro", overrides={"crosscoder": {"expansion": 2_000_000}}, device="cpu")
    assert not out.exists()
    parts = crosscoder_memory_bytes(2, 128, 1024, 256, "float32")
    n_params = 2 * 2 * 128 * 1024 + 1024 + 2 * 128
    assert parts["parameters"] == 4 * n_params and parts["optimizer"] == 3 * 4 * n_params


@pytest.mark.slow  # shares base_run, a whole micro run
def test_a_refused_run_leaves_run_json_as_it_was(run_copy: Path):
    """Reproduction 7: a refused run had already overwritten run.json."""
    before = (run_copy / "run.json").read_bytes()
    with pytest.raises(CrossdiffError):
        run_pipeline(run_copy, "micro", overrides={"crosscoder": {"k": 0}}, device="cpu", seed=3)
    assert (run_copy / "run.json").read_bytes() == before


def _live_holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    import psutil

    holder = {"pid": proc.pid, "host": os.uname().nodename}
    holder["started"] = psutil.Process(proc.pid).create_time()
    lock.write_text(json.dumps(holder))
    return proc


@pytest.mark.slow  # shares base_run, a whole micro run
def test_a_run_folder_held_by_a_live_process_is_refused_with_its_pid(run_copy: Path):
    before = (run_copy / "run.json").read_bytes()
    proc = _live_holder(run_copy / "run.lock")
    try:
        with pytest.raises(CrossdiffError, match=rf"pid {proc.pid}"):
            run_pipeline(run_copy, "micro", device="cpu", seed=5)
    finally:
        proc.communicate(b"")
    assert (run_copy / "run.json").read_bytes() == before
    # the holder has exited: its lock is stale and is taken over
    summary = run_pipeline(run_copy, "micro", device="cpu", stop_after="crosscoder")
    assert summary.skipped == ["data", "models", "store", "crosscoder"]
    assert not (run_copy / "run.lock").exists()


def test_lock_takes_over_a_stale_lock_and_names_a_live_holder(tmp_path: Path, capsys):
    lock = tmp_path / "store" / ".harvest.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with folder_lock(lock, "store x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert f"stale lock {lock} of process {dead.pid}" in capsys.readouterr().out
    assert not lock.exists()
    proc = _live_holder(lock)
    try:
        with pytest.raises(
            CrossdiffError, match=rf"in use by another crossdiff process \(pid {proc.pid}"
        ):
            acquire(lock, "store x")
    finally:
        proc.communicate(b"")
    acquire(lock, "store x")  # the holder exited
    release(lock)
    assert not lock.exists()


# --- train-crosscoder: reproductions 1 and 6 -------------------------------------------------


def parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture
def two_stores(monkeypatch):
    acts_a, _ = planted_crosscoder_data(1024, 8, 6, 3, 3, densities=(0.1, 0.3), seed=0)
    acts_b, _ = planted_crosscoder_data(1024, 8, 6, 3, 3, densities=(0.1, 0.3), seed=1)
    stores = {"A": InMemoryStore(acts_a), "B": InMemoryStore(acts_b)}
    monkeypatch.setattr(commands, "_open_store", lambda path: stores[Path(path).name])
    return stores


def train_cli(out: Path, *extra: str) -> dict:
    argv = ["train-crosscoder", "--out", str(out), "--d-sae", "32", "--steps", "20"]
    argv += ["--batch-size", "128", "--checkpoint-every", "10", "--device", "cpu"]
    argv += ["--eval-tokens", "512", *extra]
    args = parse(argv)
    assert args.func(args) == 0
    return json.loads((out / "training.json").read_text())


def test_train_crosscoder_overwrite_with_another_k_starts_over(tmp_path, two_stores, capsys):
    """Reproduction 1: --k 4 --overwrite after a k = 2.5 run returned the old weights as k = 4."""
    torch.set_num_threads(1)
    out = tmp_path / "cc"
    train_cli(out, "--store", "A", "--k", "2.5")
    old = weights(out)
    with pytest.raises(CrossdiffError, match=r"config\.k: 2\.5 -> 4"):
        train_cli(out, "--store", "A", "--k", "4")  # without --overwrite: refused, named
    again = train_cli(out, "--store", "A", "--k", "4", "--overwrite")
    assert again["config"]["k"] == 4 and again["training"]["resumed_from_step"] == 0
    new = weights(out)
    assert any(not torch.equal(old[k], new[k]) for k in old)
    train_cli(out, "--store", "A", "--k", "4")
    assert "already trained with these settings" in capsys.readouterr().out


def test_train_crosscoder_overwrite_with_another_store_starts_over(tmp_path, two_stores):
    """Reproduction 1: --overwrite --store OTHER resumed the other store's checkpoint."""
    torch.set_num_threads(1)
    out = tmp_path / "cc"
    train_cli(out, "--store", "A", "--k", "2")
    other = train_cli(out, "--store", "B", "--k", "2", "--overwrite")
    assert other["training"]["resumed_from_step"] == 0
    assert other["metrics"]["fve"] > 0.3
    # a checkpoint of store B is never resumed on store A
    (out / "training.json").unlink()
    with pytest.raises(CrossdiffError, match="source"):
        train_cli(out, "--store", "A", "--k", "2")


def test_checkpoint_of_another_k_is_never_resumed(tmp_path):
    acts, _ = planted_crosscoder_data(1024, 8, 6, 3, 3, densities=(0.1, 0.3), seed=0)
    opts = {"steps": 10, "batch_size": 128, "checkpoint_dir": tmp_path, "checkpoint_every": 5}
    train_crosscoder(acts, CrossCoderConfig(d_model=8, d_sae=32, k=2.5), **opts)
    with pytest.raises(CrossdiffError, match=r"config\.k: 2\.5 -> 4"):
        train_crosscoder(acts, CrossCoderConfig(d_model=8, d_sae=32, k=4), **opts)
    with pytest.raises(CrossdiffError, match="source"):
        train_crosscoder(acts * 2, CrossCoderConfig(d_model=8, d_sae=32, k=2.5), **opts)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--d-sae", "0"], "--d-sae 0"),
        (["--expansion", "0"], "--expansion 0"),
        (["--k", "0"], "--k 0"),
        (["--steps", "0", "--batch-size", "0"], "--steps 0: must be at least 1; --batch-size 0"),
    ],
)
def test_train_crosscoder_refuses_bad_options_before_reading_the_store(tmp_path, flags, message):
    """Reproduction 6: --d-sae 0 silently trained d_sae = expansion x d_model."""
    argv = ["train-crosscoder", "--store", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    args = parse(argv + flags)
    with pytest.raises(CrossdiffError, match=message):
        args.func(args)
    assert not (tmp_path / "o").exists()


# --- fingerprints themselves ------------------------------------------------------------------


def test_folder_fingerprint_follows_content_not_checkpoints_or_records(tmp_path: Path):
    folder = tmp_path / "stage"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"abc")
    first = folder_fingerprint(folder)
    (folder / "checkpoints" / "state.json").write_text("{}")
    (folder / "stage.json").write_text("{}")
    (folder / ".stage.pending.json").write_text("{}")
    assert folder_fingerprint(folder) == first
    (folder / "weights.bin").write_bytes(b"abd")
    assert folder_fingerprint(folder) != first


def test_store_fingerprint_and_change_descriptions():
    acts, _ = planted_crosscoder_data(256, 8, 6, 3, 3, densities=(0.1, 0.3), seed=0)
    assert store_fingerprint(InMemoryStore(acts)) == store_fingerprint(acts)
    assert store_fingerprint(InMemoryStore(acts)) != store_fingerprint(InMemoryStore(acts + 1))
    text = describe_changes({"k": 8, "lr": None, "a": {"b": 1}}, {"k": 16, "a": {"b": 2}})
    assert text == "a.b: 1 -> 2, k: 8 -> 16"
