"""Nothing lost, nothing silently wrong (issue 29): `crossdiff run` checks every option against what
it refers to before it moves or removes a stage folder, puts a redone stage back when it fails
before writing, re-verifies a skipped stage's files against its record, refuses a folder a stage
subcommand rewrote, and a crosscoder (and tokenizer) is checked against the store it is given.

The fast tests use small planted stores and a stage graph of their own; the `run_folder` ones
share one micro run stopped after the crosscoder (each works on a copy of it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from planted_store import write_planted_store

from crossdiff import diff_features, evaluate_crosscoder, train_crosscoder
from crossdiff.activations import ActivationStore
from crossdiff.cli import main as cli_main
from crossdiff.crosscoder import CrossCoder
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.run.stage_graph import StageRunner
from crossdiff.run.stage_record import RECORD
from tests.test_faults import CFG, D_MODEL, SHARD, TRAIN, planted

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:store .* has no held-out tokens:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]


# --- a stage graph of our own: redo moves aside, skip re-verifies, subcommands mark -----------


def _runner(out: Path) -> StageRunner:
    return StageRunner(out, {"a": (), "b": ("a",)}, True, lambda: None)


def _make(out: Path, options_a: dict, *, fail_a: bool = False, write_a: bool = True) -> StageRunner:
    """Run stages a (writes a/cfg.json) and b (writes b/out.txt) into `out`, as pipeline does."""
    runner = _runner(out)
    try:
        folder, done = runner.begin("a", options_a)
        if not done:
            if write_a:
                (folder / "cfg.json").write_text(json.dumps(options_a))
            if fail_a:
                raise CrossdiffError("a refused its input")
            runner.finish("a")
        folder, done = runner.begin("b", {})
        if not done:
            (folder / "out.txt").write_text("made from a")
            runner.finish("b")
    except BaseException:
        runner.failed()
        raise
    return runner


def test_a_redo_that_fails_before_writing_puts_the_old_stages_back(tmp_path):
    from crossdiff.run.stage_record import aside_dir

    _make(tmp_path, {"k": 8})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CrossdiffError, match="refused its input"):
        _make(tmp_path, {"k": 16}, fail_a=True, write_a=False)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # a and b back as they were, records included
    assert not aside_dir(tmp_path, "a").exists()
    # a redo that finishes replaces them and leaves nothing aside
    _make(tmp_path, {"k": 16})
    assert json.loads((tmp_path / "a" / "cfg.json").read_text()) == {"k": 16}
    assert not (tmp_path / ".aside").exists()


def test_a_redo_that_fails_after_writing_keeps_the_old_stages_aside_until_it_finishes(tmp_path):
    from crossdiff.run.stage_record import aside_dir

    _make(tmp_path, {"k": 8})
    with pytest.raises(CrossdiffError):
        _make(tmp_path, {"k": 16}, fail_a=True)
    kept = aside_dir(tmp_path, "a")
    assert json.loads((kept / "a" / "cfg.json").read_text()) == {"k": 8}
    assert (kept / "b" / "out.txt").exists()
    _make(tmp_path, {"k": 16})  # resumes and finishes: what was aside goes
    assert not kept.exists()


def test_a_skipped_stage_whose_file_was_edited_is_refused_naming_the_file(tmp_path):
    _make(tmp_path, {"k": 8})
    edited = tmp_path / "a" / "cfg.json"
    edited.write_text(json.dumps({"k": 16}))  # k 8 -> 16 by hand
    with pytest.raises(CrossdiffError, match=r"a/cfg\.json|cfg\.json \(changed\)") as err:
        _make(tmp_path, {"k": 8})
    assert "changed after the a stage finished" in str(err.value)
    assert json.loads(edited.read_text()) == {"k": 16}  # neither reused nor removed
    assert (tmp_path / "b" / "out.txt").exists()
    (tmp_path / "a" / "extra.bin").write_bytes(b"x")
    edited.write_text(json.dumps({"k": 8}))
    with pytest.raises(CrossdiffError, match=r"extra\.bin \(added\)"):
        _make(tmp_path, {"k": 8})
    (tmp_path / "a" / "extra.bin").unlink()
    _make(tmp_path, {"k": 8})  # restored: reused again


def test_a_stage_record_marked_by_a_subcommand_is_refused(tmp_path):
    from crossdiff.run.stage_record import mark_written_by

    _make(tmp_path, {"k": 8})
    assert mark_written_by(tmp_path / "a", "crossdiff train-crosscoder")
    with pytest.raises(CrossdiffError, match="written by `crossdiff train-crosscoder`"):
        _make(tmp_path, {"k": 8})
    assert (tmp_path / "a" / "cfg.json").exists() and (tmp_path / "b" / "out.txt").exists()


# --- a crosscoder knows what it reads ----------------------------------------------------------


def write_store(path: Path, acts: torch.Tensor, **header_keys) -> ActivationStore:
    """A float32 store of `acts` [n, 2, D_MODEL] with hooks, model hashes and a tokenizer."""
    models = [
        {"name": "dense", "config_hash": "c0", "weights_hash": "w0", "d_model": D_MODEL},
        {"name": "moe", "config_hash": "c1", "weights_hash": "w1", "d_model": D_MODEL},
    ]
    tokenizer = {"name": "planted-bpe", "fingerprint": "tok0", "vocab_size": 4096}
    header = {"models": models, "tokenizer": tokenizer, **header_keys}
    return write_planted_store(path, acts, shard=SHARD, **header)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, ActivationStore]:
    """The store a crosscoder is trained on, and three it was not: other hooks, other model
    weights, other tokens of the same models and hooks."""
    root = tmp_path_factory.mktemp("stores")
    acts = planted()
    other_models = [
        {"name": "dense", "config_hash": "c0", "weights_hash": "w9", "d_model": D_MODEL},
        {"name": "moe", "config_hash": "c1", "weights_hash": "w1", "d_model": D_MODEL},
    ]
    return {
        "trained": write_store(root / "trained", acts),
        "hooks": write_store(root / "hooks", acts, hook_points={"dense": ["g"], "moe": ["g"]}),
        "models": write_store(root / "models", acts, models=other_models),
        "tokens": write_store(root / "tokens", acts.flip(0)),
    }


@pytest.fixture(scope="module")
def crosscoder(stores, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cc") / "cc"
    train_crosscoder(stores["trained"], CFG, **TRAIN).save(folder)
    return folder


@pytest.mark.parametrize(
    ("other", "named"),
    [("hooks", "hook points"), ("models", "weights_hash"), ("tokens", "store fingerprint")],
)
def test_a_crosscoder_on_a_store_it_was_not_trained_on_is_refused(stores, crosscoder, other, named):
    cc = CrossCoder.load(crosscoder)
    for apply in (diff_features, evaluate_crosscoder):
        with pytest.raises(CrossdiffError, match=named) as err:
            apply(cc, stores[other], **({"show_progress": False} if apply is diff_features else {}))
        assert "allow_mismatch=True" in str(err.value)
    # deliberate transfer: allowed, and said in the results
    diff = diff_features(cc, stores[other], allow_mismatch=True, show_progress=False)
    assert any(named in m for m in diff.summary["mismatch"])
    assert any("allow_mismatch" in w for w in diff.summary["warnings"])
    metrics = evaluate_crosscoder(cc, stores[other], allow_mismatch=True)
    assert any(named in m for m in metrics["mismatch"])
    # its own store passes, and records nothing
    diff = diff_features(cc, stores["trained"], show_progress=False)
    assert "mismatch" not in diff.summary
    assert "mismatch" not in evaluate_crosscoder(cc, stores["trained"])


def test_a_live_trained_crosscoder_is_checked_for_models_and_hooks_not_the_store(stores):
    """Trained on live activations, a crosscoder records their models and hooks (no store): the
    run's small report store of the same models passes; a store of other hooks does not."""
    from crossdiff.crosscoder.compatibility import crosscoder_mismatches

    manifest = stores["trained"].manifest
    live_cc = SimpleNamespace(
        cfg=SimpleNamespace(
            metadata={
                "store_fingerprint": "live0",
                "hook_points": manifest["hook_points"],
                "models": manifest["models"],
            }
        )
    )
    assert crosscoder_mismatches(live_cc, stores["trained"]) == []
    assert crosscoder_mismatches(live_cc, stores["tokens"]) == []
    assert any("hook points" in m for m in crosscoder_mismatches(live_cc, stores["hooks"]))
    assert any("weights_hash" in m for m in crosscoder_mismatches(live_cc, stores["models"]))


def test_report_cli_refuses_another_store_unless_allowed_and_records_it(
    stores, crosscoder, tmp_path, capsys
):
    base = ["report", "--crosscoder", str(crosscoder), "--store", str(stores["hooks"].path)]
    common = ["--splice-sequences", "0", "--device", "cpu"]
    code = cli_main([*base, "--out", str(tmp_path / "refused"), *common])
    assert code != 0
    assert "hook points" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "report.json").exists()
    code = cli_main([*base, "--out", str(tmp_path / "moved"), *common, "--allow-mismatch"])
    assert code == 0
    summary = json.loads((tmp_path / "moved" / "report.json").read_text())["summary"]
    assert any("hook points" in m for m in summary["mismatch"])
    assert "allow_mismatch" in (tmp_path / "moved" / "report.md").read_text()


def test_a_tokenizer_other_than_the_stores_is_refused(stores, crosscoder):
    cc = CrossCoder.load(crosscoder)
    other = SimpleNamespace(name="other-bpe", fingerprint="tok1")
    with pytest.raises(CrossdiffError, match="tokenizer.*tok0.*tok1"):
        diff_features(cc, stores["trained"], tokenizer=other, show_progress=False)
    from crossdiff.crosscoder.compatibility import tokenizer_mismatch

    assert tokenizer_mismatch(SimpleNamespace(fingerprint="tok0"), stores["trained"]) is None


def test_a_tokenizer_name_is_loaded_not_ignored(stores, crosscoder, monkeypatch):
    """diff_features(tokenizer='gpt2') loads it (here: offline, so a clear refusal), never
    silently decodes contexts as token ids."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cc = CrossCoder.load(crosscoder)
    with pytest.raises(CrossdiffError, match="gpt2"):
        diff_features(cc, stores["trained"], tokenizer="gpt2", show_progress=False)


def test_logit_effects_without_models_say_so(tmp_path, capsys):
    from crossdiff.analysis.logit_effects import load_residual_models

    manifest = {"hook_points": {"dense": ["blocks.1.hook_resid_post"], "moe": ["x"]}}
    loaded, hooks = load_residual_models(tmp_path / "no-models", manifest, ["dense", "moe"])
    assert loaded == {} and "dense" in hooks
    out = capsys.readouterr().out
    assert "no logit effects" in out and str(tmp_path / "no-models" / "dense") in out


def test_prepare_data_zero_chars_is_refused_not_the_default(tmp_path, capsys):
    out = tmp_path / "data"
    code = cli_main(["prepare-data", "--out", str(out), "--n-chars-per-domain", "0"])
    assert code != 0
    assert "n_chars_per_domain=0 must be a positive integer" in capsys.readouterr().err
    assert not (out / "tokens_train.safetensors").exists()


# --- a micro run: options checked before any stage folder is touched ---------------------------


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    from crossdiff.run.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("micro") / "run"
    run_pipeline(out, "micro", device="cpu", stop_after="crosscoder")
    return out


def _copy(run_folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _run(out: Path, *flags: str) -> list[str]:
    return ["run", "--preset", "micro", "--out", str(out), "--device", "cpu", *flags]


@pytest.mark.slow  # pays for the run_folder fixture (a micro run without the report)
def test_too_many_harvest_tokens_or_a_typo_hook_remove_nothing(run_folder, tmp_path, capsys):
    out = _copy(run_folder, tmp_path)
    before = _snapshot(out)
    code = cli_main(_run(out, "--harvest-tokens", "500000", "--stop-after", "crosscoder"))
    err = capsys.readouterr().err
    assert code != 0 and "n_tokens=500000" in err and "121920" in err
    assert _snapshot(out) == before  # run.json included: it still says 12000
    pairing = tmp_path / "typo.toml"
    pairing.write_text(
        '[[sites]]\na = "blocks.2.hook_resid_pots"\nb = "blocks.2.hook_resid_post"\n'
    )
    code = cli_main(_run(out, "--pairing", str(pairing), "--stop-after", "crosscoder"))
    err = capsys.readouterr().err
    assert code != 0 and "blocks.2.hook_resid_pots" in err
    assert _snapshot(out) == before


@pytest.mark.slow  # shares run_folder
def test_edited_files_of_a_finished_run_are_refused_not_reused(run_folder, tmp_path, capsys):
    out = _copy(run_folder, tmp_path)
    edits = {
        "crosscoder/cfg.json": lambda c: c.update(k=16),
        "store/manifest.json": lambda c: c["scaling_factors"].__setitem__(0, 1.0),
        "models/dense/config.json": lambda c: c["config"].update(act_fn="relu"),
    }
    for rel, edit in edits.items():
        path = out / rel
        original = path.read_bytes()
        content = json.loads(original)
        edit(content)
        path.write_text(json.dumps(content))
        edited = _snapshot(out)
        code = cli_main(_run(out, "--stop-after", "crosscoder"))
        err = capsys.readouterr().err
        stage = rel.split("/")[0]
        assert code != 0, rel
        assert f"{out / stage} changed after the {stage} stage finished" in err, err
        assert Path(rel).relative_to(stage).as_posix() in err
        assert _snapshot(out) == edited  # nothing reused, nothing removed
        path.write_bytes(original)
    assert cli_main(_run(out, "--stop-after", "crosscoder")) == 0


@pytest.mark.slow  # shares run_folder
def test_stage_subcommands_writing_into_a_run_mark_its_records(run_folder, tmp_path, capsys):
    out = _copy(run_folder, tmp_path)
    # harvest --no-resume into the run's store: checked before anything is removed, then marked
    code = cli_main(
        ["harvest", "--models", str(out / "models" / "dense"), str(out / "models" / "moe"),
         "--out", str(out / "store"), "--no-resume", "--tokens", "3000", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert ActivationStore(out / "store").n_tokens == 3000
    record = json.loads((out / "store" / RECORD).read_text())
    assert record["written_by"] == "crossdiff harvest"
    capsys.readouterr()
    code = cli_main(_run(out, "--stop-after", "crosscoder"))
    assert code != 0 and "written by `crossdiff harvest`" in capsys.readouterr().err
    assert ActivationStore(out / "store").n_tokens == 3000  # not removed

    out = _copy(run_folder, tmp_path / "second")
    code = cli_main(
        ["train-crosscoder", "--store", str(out / "store"), "--out", str(out / "crosscoder"),
         "--overwrite", "--k", "4", "--expansion", "2", "--steps", "20", "--batch-size", "256",
         "--device", "cpu"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "crosscoder" / RECORD).read_text())
    assert record["written_by"] == "crossdiff train-crosscoder"
    capsys.readouterr()
    assert cli_main(_run(out, "--stop-after", "crosscoder")) != 0
    assert "written by `crossdiff train-crosscoder`" in capsys.readouterr().err
    assert json.loads((out / "crosscoder" / "cfg.json").read_text())["k"] == 4


@pytest.mark.slow  # shares run_folder
def test_stop_after_keeps_run_json_with_the_folders(run_folder, tmp_path):
    out = _copy(run_folder, tmp_path)
    assert cli_main(_run(out, "--k", "16", "--stop-after", "store")) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["options"]["crosscoder"]["k"] == 8  # the crosscoder folder's, not 16
    assert json.loads((out / "crosscoder" / "cfg.json").read_text())["k"] == 8
    assert record["stopped_after"] == "store"
