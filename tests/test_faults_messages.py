"""One-line errors instead of tracebacks, and exact messages (issue 29): a full disk reported by
safetensors, failed LM workers, bfloat16 in the report, seeds out of range, a damaged
explorer.json, Ctrl-C, wrong values at the public API, a damaged optimizer state, float16
training, an interrupted report and a symbolic-linked stage folder. docs/reliability.md lists
what each test guarantees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_faults import CFG, TRAIN, copy_folder, planted, run_cli, write_store

import crossdiff.crosscoder.checkpoint as checkpoint_module
import crossdiff.models.checkpoints as lm_checkpoint_module
from crossdiff import CrossCoderConfig, diff_features, train_crosscoder, write_report
from crossdiff.cli import main as cli_main
from crossdiff.crosscoder import CrossCoder
from crossdiff.plumbing.common import CrossdiffError, DiskFullError
from crossdiff.plumbing.integrity import sha256_of_file, write_checksum

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
REPO = Path(__file__).resolve().parents[1]
# what safetensors raises when the disk fills while it writes (its Rust io::Error, in the text)
FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'  # noqa: E501
QUOTA = 'Error while serializing: IoError(Os { code: 122, kind: QuotaExceeded, message: "Disk quota exceeded" })'  # noqa: E501


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(store folder, saved crosscoder folder)."""
    root = tmp_path_factory.mktemp("trained")
    store = write_store(root / "store", planted())
    train_crosscoder(store, CFG, **TRAIN).save(root / "cc")
    return root / "store", root / "cc"


@pytest.fixture(scope="module")
def report_dir(trained, tmp_path_factory) -> Path:
    store_dir, cc_dir = trained
    from crossdiff.activations import ActivationStore

    out = tmp_path_factory.mktemp("report") / "report"
    diff = diff_features(CrossCoder.load(cc_dir), ActivationStore(store_dir), show_progress=False)
    write_report(diff, out, quiet=True)
    return out


def lm_run(out: Path, *, parallel: bool = False, dtype: torch.dtype = torch.float32):
    """Both language models, tiny, on random tokens (2 checkpoints each); as test_faults.py's."""
    from crossdiff.data.tokens import TokenSet
    from crossdiff.models import matched_configs, train_language_models

    g = torch.Generator().manual_seed(0)
    sets = []
    for n in (24, 6):
        sets.append(
            TokenSet(
                tokens=torch.randint(1, 40, (n, 12), generator=g),
                doc_ids=torch.arange(n)[:, None].expand(n, 12).clone(),
                doc_positions=torch.arange(-1, 11)[None].expand(n, 12).clone(),
                domains=torch.arange(n) % 3,
            )
        )
    small = dict(d_model=16, n_heads=2, n_layers=1, d_vocab=40, n_ctx=12, d_mlp=32, device="cpu")
    dense, moe = matched_configs("tiny", **small, num_experts=4, dtype=dtype)
    return train_language_models(
        *sets, out, dense_cfg=dense, moe_cfg=moe, parallel=parallel, steps=6, batch_size=4,
        lr=1e-2, warmup=2, eval_every=100, checkpoint_every=2,
    )  # fmt: skip


def raises_safetensors(message: str):
    def save(*args, **kwargs):
        raise SafetensorError(message)

    return save


# --- a full disk, as safetensors reports it ----------------------------------------------------


def test_disk_full_in_safetensors_while_writing_a_crosscoder_checkpoint(tmp_path, monkeypatch):
    store = write_store(tmp_path / "store", planted())
    monkeypatch.setattr(checkpoint_module, "save_file", raises_safetensors(FULL))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(DiskFullError, match=r"disk is full: could not write .*state_000000010"):
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    assert list(ckpt.iterdir()) == []  # no partial or temporary file
    monkeypatch.setattr(checkpoint_module, "save_file", raises_safetensors(QUOTA))
    with pytest.raises(DiskFullError, match="disk is full") as err:
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    assert err.value.errno == 122


def test_disk_full_in_safetensors_while_saving_a_crosscoder_model_or_token_set(
    trained, tmp_path, monkeypatch
):
    import crossdiff.data.tokens as tokens_module
    import crossdiff.models.io as io_module
    from crossdiff.data.tokens import TokenSet
    from crossdiff.models import build_model, dense_config, save_model

    cc = CrossCoder.load(trained[1])

    def full_disk(self, path, *args, **kwargs):
        raise SafetensorError(FULL)

    monkeypatch.setattr(CrossCoder, "save_model", full_disk)
    with pytest.raises(DiskFullError, match=r"sae_weights.safetensors \(it needs about"):
        cc.save(tmp_path / "cc")
    assert list((tmp_path / "cc").iterdir()) == []
    monkeypatch.setattr(io_module, "save_file", raises_safetensors(FULL))
    model = build_model(dense_config("tiny", d_model=16, n_layers=1, d_vocab=50))
    with pytest.raises(DiskFullError, match=r"could not write .*model.safetensors"):
        save_model(model, tmp_path / "model")
    monkeypatch.setattr(tokens_module, "save_file", raises_safetensors(FULL))
    tokens = TokenSet(
        tokens=torch.zeros(2, 4, dtype=torch.long),
        doc_ids=torch.zeros(2, 4, dtype=torch.long),
        doc_positions=torch.arange(4).expand(2, 4).clone(),
        domains=torch.zeros(2, dtype=torch.long),
    )
    with pytest.raises(DiskFullError, match=r"could not write .*t.safetensors"):
        tokens.save(tmp_path / "t.safetensors")
    # another I/O failure inside safetensors: one line naming the file, not a traceback
    monkeypatch.setattr(io_module, "save_file", raises_safetensors("IoError(Os { code: 5 })"))
    with pytest.raises(CrossdiffError, match=r"could not write .*model.safetensors: .*code: 5"):
        save_model(model, tmp_path / "model2")


def test_disk_full_while_writing_a_language_model_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_checkpoint_module, "save_file", raises_safetensors(FULL))
    with pytest.raises(DiskFullError, match=r"could not write .*checkpoint.safetensors"):
        lm_run(tmp_path)
    assert not list((tmp_path / "checkpoints" / "dense").glob("*.tmp"))


def test_a_worker_that_fails_reports_one_line(tmp_path, monkeypatch, capsys):
    import crossdiff.models.train as train_module
    from crossdiff.models import worker

    spec = tmp_path / "w.json"
    spec.write_text(json.dumps({"error_file": str(tmp_path / "err.txt")}))

    def full(path):
        raise SafetensorError(FULL)

    monkeypatch.setattr(train_module, "run_worker", full)
    assert worker.main([str(spec)]) == 1
    assert "the disk is full" in (tmp_path / "err.txt").read_text()

    def bug(path):
        raise RuntimeError("something odd")

    monkeypatch.setattr(train_module, "run_worker", bug)
    assert worker.main([str(spec)]) == 1
    assert (tmp_path / "err.txt").read_text().startswith("RuntimeError: something odd")


def test_a_worker_that_dies_without_a_message_is_named(tmp_path, monkeypatch):
    """A worker that leaves no error file: the parent says so (it said 'exit code 1: ;')."""
    import crossdiff.models.processes as processes

    real_popen = processes.subprocess.Popen

    def dies(command, **kwargs):
        return real_popen([sys.executable, "-c", "raise SystemExit(1)"], **kwargs)

    monkeypatch.setattr(processes.subprocess, "Popen", dies)
    with pytest.raises(CrossdiffError) as err:
        lm_run(tmp_path, parallel=True)
    message = str(err.value)
    assert "dense (exit code 1): it stopped without a message" in message
    assert ": ;" not in message


# --- bfloat16, seeds, a damaged explorer.json, Ctrl-C --------------------------------------------


def test_report_in_bfloat16(trained, tmp_path, capsys):
    store_dir, cc_dir = trained
    out = tmp_path / "report"
    argv = ["report", "--crosscoder", str(cc_dir), "--store", str(store_dir), "--out", str(out)]
    code, err = run_cli([*argv, "--dtype", "bfloat16", "--device", "cpu"], capsys)
    assert code == 0, err
    data = json.loads((out / "report.json").read_text())
    assert 0.3 < data["summary"]["reconstruction"]["fve"] <= 1  # float32: 0.64 here


def test_seed_out_of_range_is_refused(trained, tmp_path, capsys):
    store_dir, cc_dir = trained
    argv = ["report", "--crosscoder", str(cc_dir), "--store", str(store_dir)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--out", str(tmp_path / "r"), "--seed", str(2**64)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--seed=18446744073709551616 is out of range" in err
    assert not (tmp_path / "r").exists()
    config = tmp_path / "c.toml"  # a config file's seed bypasses argparse's type
    config.write_text(f"seed = {2**64}\n")
    code, err = run_cli([*argv, "--out", str(tmp_path / "r"), "--config", str(config)], capsys)
    assert code == 2 and "out of range" in err and "Traceback" not in err
    with pytest.raises(CrossdiffError, match="seed=18446744073709551616 is out of range"):
        train_crosscoder(planted(), CFG, **TRAIN, seed=2**64)


def test_truncated_explorer_json_is_a_one_line_error(report_dir, tmp_path, capsys):
    folder = copy_folder(report_dir, tmp_path / "report")
    explorer = folder / "explorer.json"
    explorer.write_bytes(explorer.read_bytes()[:100])
    code, err = run_cli(["inspect", str(folder), "0"], capsys)
    assert code == 2 and "explorer.json is damaged or cut short" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    explorer.write_bytes(b"\xff\xfe")  # not UTF-8 either
    code, err = run_cli(["inspect", str(folder), "0"], capsys)
    assert code == 2 and "damaged or cut short" in err


def test_ctrl_c_is_one_line_and_exit_130(report_dir, monkeypatch, capsys):
    import crossdiff.report.inspect as inspect_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_module, "run_inspect", interrupted)
    try:
        code, err = run_cli(["inspect", str(report_dir), "0"], capsys)
    except KeyboardInterrupt:  # caught here: pytest would take it as the user's and stop
        pytest.fail("the CLI let KeyboardInterrupt through (a traceback for the user)")
    assert code == 130
    assert err.strip() == (
        "crossdiff inspect: interrupted (Ctrl-C); finished files are kept, run the same command "
        "again to resume"
    )


@pytest.mark.slow
def test_sigint_during_a_run_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "crossdiff", "run", "--preset", "micro", "--device", "cpu"]
    process = subprocess.Popen(
        [*command, "--out", str(tmp_path / "run")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # started: past the imports, into the stages
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in err.strip().splitlines()[-1]


# --- the public API, as a user meets it (no test-only beartype hook: a fresh interpreter) -------

API_SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, warnings
    from pathlib import Path
    warnings.filterwarnings("ignore")
    sys.path.insert(0, sys.argv[1])
    import torch
    import crossdiff
    from test_faults import planted, write_store, CFG, TRAIN
    from crossdiff import (CrossCoderConfig, diff_features, evaluate_crosscoder, harvest,
                           matched_configs, build_model, train_crosscoder, write_report)
    root = Path(sys.argv[2])
    store = write_store(root / "store", planted())
    cc = crossdiff.CrossCoder(CFG)
    small = dict(d_model=16, n_heads=2, n_layers=1, d_vocab=40, n_ctx=12, d_mlp=32, device="cpu")
    dense, moe = matched_configs("tiny", **small, num_experts=4)
    models = build_model(dense), build_model(moe)
    (root / "a_file").write_text("x")
    diff = diff_features(cc, store, show_progress=False)
    huge = planted() * 1e30
    cases = {
        "rows_longer_than_n_ctx": lambda: harvest(
            *models, torch.zeros(4, 20, dtype=torch.long), "single-layer", root / "s",
            progress=False),
        "d_sae_string": lambda: CrossCoderConfig(d_model=8, d_sae="64", k=2),
        "lr_nan": lambda: train_crosscoder(store, CFG, **TRAIN, lr=float("nan")),
        "lr_negative": lambda: train_crosscoder(store, CFG, **TRAIN, lr=-1),
        "path_as_store_train": lambda: train_crosscoder(str(root / "store"), CFG, **TRAIN),
        "path_as_store_evaluate": lambda: evaluate_crosscoder(cc, str(root / "store")),
        "path_as_store_diff": lambda: diff_features(cc, root / "store"),
        "none_crosscoder_diff": lambda: diff_features(None, store),
        "none_crosscoder_evaluate": lambda: evaluate_crosscoder(None, store),
        "none_diff": lambda: write_report(None, root / "r"),
        "report_into_a_file": lambda: write_report(diff, root / "a_file", quiet=True),
        "seed_beyond_64_bits": lambda: train_crosscoder(store, CFG, **TRAIN, seed=2**70),
        "activations_times_1e30": lambda: evaluate_crosscoder(
            train_crosscoder(huge, CFG, **TRAIN), huge)["fve"],
    }
    out = {}
    for name, call in cases.items():
        try:
            out[name] = ["ok", repr(call())]
        except BaseException as err:
            out[name] = [type(err).__name__, str(err)]
    print("RESULT " + json.dumps(out))
    """
)

API_CASES = {
    "rows_longer_than_n_ctx": "token rows have 20 tokens but model 'A' reads at most n_ctx=12",
    "d_sae_string": "d_sae must be a whole number, got '64'",
    "lr_nan": "train_crosscoder: lr=nan must be a finite number greater than 0",
    "lr_negative": "train_crosscoder: lr=-1 must be a finite number greater than 0",
    "path_as_store_train": "pass crossdiff.ActivationStore(path)",
    "path_as_store_evaluate": "pass crossdiff.ActivationStore(path)",
    "path_as_store_diff": "pass crossdiff.ActivationStore(path)",
    "none_crosscoder_diff": "diff_features: cc must be a crosscoder",
    "none_crosscoder_evaluate": "evaluate_crosscoder: cc must be a crosscoder",
    "none_diff": "write_report: diff must be a FeatureDiff",
    "report_into_a_file": "a_file is a file, not a folder",
    "seed_beyond_64_bits": "seed=1180591620717411303424 is out of range",
}


@pytest.fixture(scope="module")
def api_results(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("api")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", API_SCRIPT, str(REPO / "tests"), str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow  # a fresh interpreter: imports torch, SAELens and TransformerLens again
@pytest.mark.parametrize("case", sorted(API_CASES))
def test_wrong_values_at_the_api_are_crossdiff_errors(api_results, case):
    kind, message = api_results[case]
    assert kind == "CrossdiffError", f"{case}: {kind}: {message}"
    assert API_CASES[case] in message and "\n" not in message


@pytest.mark.slow
def test_activations_scaled_by_1e30_train_a_working_crosscoder(api_results):
    kind, fve = api_results["activations_times_1e30"]
    assert kind == "ok", fve
    assert float(fve) > 0.5  # the same planted data unscaled gives about 0.64


def test_wrong_values_at_the_api_in_this_process(trained, two_diffs, tmp_path):
    """The cases the tests' beartype hook lets through, in this process (the slow test above
    runs every case as a user's script meets it)."""
    from crossdiff import evaluate_crosscoder, harvest, matched_configs
    from crossdiff.activations import ActivationStore
    from crossdiff.models import build_model

    store, cc = ActivationStore(trained[0]), CrossCoder.load(trained[1])
    small = dict(d_model=16, n_heads=2, n_layers=1, d_vocab=40, n_ctx=12, d_mlp=32, device="cpu")
    models = [build_model(c) for c in matched_configs("tiny", **small, num_experts=4)]
    rows = torch.zeros(4, 20, dtype=torch.long)
    (tmp_path / "a_file").write_text("x")
    cases = [
        (lambda: train_crosscoder(store, CFG, **TRAIN, lr=float("nan")), "lr=nan must be a"),
        (lambda: train_crosscoder(store, CFG, **TRAIN, lr=-1.0), "lr=-1.0 must be a finite"),
        (lambda: diff_features(None, store), "diff_features: cc must be a crosscoder"),
        (lambda: evaluate_crosscoder(None, store), "evaluate_crosscoder: cc must be a crosscoder"),
        (lambda: diff_features(cc, str(trained[0])), r"pass crossdiff.ActivationStore\(path\)"),
        (lambda: write_report(two_diffs[0], tmp_path / "a_file"), "a_file is a file, not a"),
        (
            lambda: harvest(*models, rows, "single-layer", tmp_path / "s", progress=False),
            "token rows have 20 tokens but model 'A' reads at most n_ctx=12",
        ),
    ]
    for call, message in cases:
        with pytest.raises(CrossdiffError, match=message):
            call()
    huge = planted() * 1e30
    assert evaluate_crosscoder(train_crosscoder(huge, CFG, **TRAIN), huge)["fve"] > 0.5


# --- a damaged optimizer state: named and moved aside --------------------------------------------


def _rewrite(path: Path, edit) -> None:
    """Apply `edit` to the tensors of `path`, keeping its metadata (a valid safetensors file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("damage", ["nan", "negative"])
def test_damaged_adam_state_in_a_crosscoder_checkpoint_is_moved_aside(
    tmp_path, monkeypatch, damage
):
    from crossdiff.crosscoder.training_sae import TrainingCrossCoder

    store = write_store(tmp_path / "store", planted())
    ckpt = tmp_path / "ckpt"
    real = TrainingCrossCoder.training_forward_pass

    def stopped_at_step_25(self, step_input):
        if step_input.n_training_steps == 25:
            raise KeyboardInterrupt  # the run stops; its step-20 checkpoint stays
        return real(self, step_input)

    monkeypatch.setattr(TrainingCrossCoder, "training_forward_pass", stopped_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    monkeypatch.setattr(TrainingCrossCoder, "training_forward_pass", real)
    state = json.loads((ckpt / "state.json").read_text())
    state_file = ckpt / state["tensors"]
    suffix = ".exp_avg" if damage == "nan" else ".exp_avg_sq"
    key = next(k for k in load_file(state_file) if k.startswith("adam.") and k.endswith(suffix))
    value = float("nan") if damage == "nan" else -1.0

    def edit(tensors):
        tensors[key].view(-1)[2] = value

    _rewrite(state_file, edit)
    # with its checksum recorded anew: the file is as written, its contents cannot be resumed
    (ckpt / "state.json").write_text(
        json.dumps(state | {"tensors_sha256": sha256_of_file(state_file)})
    )
    what = "non-finite value in the optimizer state" if damage == "nan" else "negative Adam"
    with pytest.raises(CrossdiffError) as err:
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    message = str(err.value)
    assert f"{state_file} cannot be resumed: it holds a {what}" in message
    assert key in message and f"moved aside to {ckpt / 'damaged-1'}" in message
    assert "learning rate" not in message
    assert sorted(p.name for p in (ckpt / "damaged-1").iterdir()) == [
        "state.json",
        state_file.name,
    ]
    # the same command again trains from step 0
    cc = train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    assert cc.training_summary["resumed_from_step"] == 0


def test_damaged_adam_state_in_a_language_model_checkpoint_is_moved_aside(tmp_path, monkeypatch):
    import crossdiff.models.train as train_module

    real_step, calls = train_module.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after the dense model's step-2 checkpoint
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm_run(tmp_path)
    monkeypatch.setattr(train_module, "train_step", real_step)
    ckpt = tmp_path / "checkpoints" / "dense"
    path = ckpt / "checkpoint.safetensors"

    def edit(tensors):
        tensors["optim.0.exp_avg"].view(-1)[1] = float("inf")

    _rewrite(path, edit)
    write_checksum(path, sha256_of_file(path))
    with pytest.raises(CrossdiffError) as err:
        lm_run(tmp_path)
    message = str(err.value)
    assert (
        f"{path} cannot be resumed: it holds a non-finite value in the optimizer state" in message
    )
    assert "optim.0.exp_avg[" in message and f"moved aside to {ckpt / 'damaged-1'}" in message
    assert not path.exists()
    lm_run(tmp_path)  # the same command again trains the dense model from step 0
    assert (tmp_path / "dense" / "config.json").exists()


# --- float16 training -----------------------------------------------------------------------------


def test_float16_training_is_refused_with_the_reason(tmp_path):
    float16 = CrossCoderConfig(d_model=8, d_sae=32, k=2, dtype="float16")
    with pytest.raises(CrossdiffError) as err:
        train_crosscoder(planted(), float16, **TRAIN)
    message = str(err.value)
    assert "cannot be trained with float16 parameters" in message
    assert "eps (1e-8) round to 0" in message and "Train in float32" in message
    assert "lower the learning rate" not in message
    with pytest.raises(CrossdiffError, match="a language model cannot be trained with float16"):
        lm_run(tmp_path, dtype=torch.float16)
    # bfloat16 trains: same range as float32
    bf16 = CrossCoderConfig(d_model=8, d_sae=32, k=2, dtype="bfloat16")
    assert train_crosscoder(planted(), bf16, **TRAIN).W_dec.dtype == torch.bfloat16


def test_run_with_float16_crosscoder_is_refused_before_any_stage(tmp_path):
    from crossdiff.run.pipeline import run_pipeline

    with pytest.raises(
        CrossdiffError, match="(?s)refused before any stage ran.*cannot be trained with float16"
    ):
        run_pipeline(
            tmp_path / "run", "micro", overrides={"crosscoder": {"dtype": "float16"}}, device="cpu"
        )
    assert not (tmp_path / "run").exists()


# --- the report's files: one consistent set -------------------------------------------------------


@pytest.fixture(scope="module")
def two_diffs(trained):
    """Two diffs of one crosscoder that give different reports (split 'paper', 'anchors')."""
    from crossdiff.activations import ActivationStore

    store_dir, cc_dir = trained
    cc, store = CrossCoder.load(cc_dir), ActivationStore(store_dir)
    first = diff_features(cc, store, show_progress=False, split="paper")
    second = diff_features(cc, store, show_progress=False, split="anchors")
    return first, second


def test_a_failed_report_write_leaves_the_old_set(two_diffs, tmp_path, monkeypatch):
    import crossdiff.report.writer as writer_module

    old, new = two_diffs
    out = tmp_path / "report"
    write_report(old, out, quiet=True)

    def files() -> dict[str, bytes]:  # the report's files, its sidecar folder's included
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after report.json and report.md were written

    monkeypatch.setattr(writer_module, "render_report_html", crash)
    with pytest.raises(KeyboardInterrupt):
        write_report(new, out, quiet=True)
    assert files() == before  # old set, nothing else


def test_a_report_stopped_while_replacing_its_files_is_completed(
    two_diffs, tmp_path, monkeypatch, capsys
):
    import crossdiff.report.fileset as fileset

    old, new = two_diffs
    out = tmp_path / "report"
    write_report(old, out, quiet=True)
    (out / "controls.png").write_bytes(b"a figure of an older report")
    (out / ".report.json.k2j4h1xz.tmp").write_bytes(b"")  # an older version's leftover
    real_replace, moved = os.replace, []

    def killed_after_two(src, dst):
        if Path(src).parent.name == fileset.COMMIT:
            if len(moved) == 2:
                raise KeyboardInterrupt  # as kill -9: nothing after this point runs
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(fileset.os, "replace", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        write_report(new, out, quiet=True)
    monkeypatch.setattr(fileset.os, "replace", real_replace)
    assert (out / fileset.COMMIT).is_dir()  # a mixed folder, marked as such
    code, err = run_cli(["inspect", str(out), "0"], capsys)
    assert code == 2 and "is being rewritten, or its writer was stopped" in err
    fileset.recover(out)  # what the next write_report does first
    assert not (out / fileset.COMMIT).exists()
    assert not (out / "controls.png").exists()  # not part of the new set
    assert not list(out.glob(".*.tmp"))
    data = json.loads((out / "report.json").read_text())
    assert data["summary"]["split"]["name"] == "anchors"  # the new set, complete
    clean = tmp_path / "clean"
    write_report(new, clean, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for name in ("report.md", "report.html"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()


def test_stale_staging_and_temporary_files_are_removed(two_diffs, tmp_path):
    old, _ = two_diffs
    out = tmp_path / "report"
    (out / ".report.staging").mkdir(parents=True)
    (out / ".report.staging" / "report.json").write_text("{partial")
    (out / ".report.html.abcd1234.tmp").write_bytes(b"")
    write_report(old, out, quiet=True)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert json.loads((out / "report.json").read_text())["summary"]["split"]["name"] == "paper"


# --- a symbolic-linked stage folder ---------------------------------------------------------------


def test_a_symlinked_stage_folder_is_named_not_deleted_through(tmp_path):
    from crossdiff.run import stage_record

    target = tmp_path / "big-disk" / "store"
    target.mkdir(parents=True)
    (target / "manifest.json").write_text("{}")
    link = tmp_path / "run" / "store"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(CrossdiffError) as err:
        stage_record.clear([link])
    message = str(err.value)
    assert f"{link} is a symbolic link to {target}" in message and f"rm {link}" in message
    assert (target / "manifest.json").exists()
    (target / "manifest.json").unlink()  # emptied by hand: nothing to remove, the link stays
    assert stage_record.clear([link]) == [link] and link.is_symlink()
