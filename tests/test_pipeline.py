"""`crossdiff run` end to end at the `micro` size: the CPU examples run as written, a re-run skips
finished stages, and a run killed at several points finishes with the same report as one that was
never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crossdiff.plumbing.common import CrossdiffError
from crossdiff.run.pipeline import resolve_options, run_pipeline
from crossdiff.run.stage_record import RECORD

REPO = Path(__file__).resolve().parents[1]
# One torch thread in the examples' processes and (one_thread) in this one: reports made in a
# subprocess and in-process are compared for equality, and a matmul's sums split over another
# number of threads differ in their last bits.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def run_example(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def comparable(report_path: Path) -> dict:
    """The findings of a report: summary and per-latent table (not timings or file paths)."""
    report = json.loads(report_path.read_text())
    return {"summary": report["summary"], "latents": report["latents"]}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("micro") / "run"
    result = run_example("examples/quickstart.py", "--preset", "micro", "--out", str(out))
    assert "FVE per model" in result.stdout
    return out


@pytest.mark.slow  # pays for the micro_run fixture, a whole micro run (15-20 s)
def test_quickstart_writes_a_complete_report(micro_run: Path):
    report = json.loads((micro_run / "report" / "report.json").read_text())
    summary = report["summary"]
    assert sum(summary["class_counts"].values()) == summary["d_sae"] == len(report["latents"])
    fve = summary["reconstruction"]["fve_per_model"]
    assert set(fve) == {"dense", "moe"} and all(0 < v <= 1 for v in fve.values())
    for stage in ("data", "models", "store", "crosscoder"):
        record = json.loads((micro_run / stage / "stage.json").read_text())
        assert record["options"]["seed"] == 0
    assert (micro_run / "report" / "report.html").stat().st_size > 10_000


@pytest.mark.slow  # shares micro_run, a whole micro run
def test_run_crosscoder_cfg_records_what_it_read(micro_run: Path):
    """Provenance of `crossdiff run`: model and hook names, store and tokenizer fingerprints."""
    from crossdiff.activations import ActivationStore
    from crossdiff.data import load_tokenizer
    from crossdiff.plumbing.fingerprint import store_fingerprint

    metadata = json.loads((micro_run / "crosscoder" / "cfg.json").read_text())["metadata"]
    hook = "blocks.2.hook_resid_post"
    assert metadata["model_names"] == ["dense", "moe"]
    assert metadata["hook_points"] == {"dense": [hook], "moe": [hook]}
    assert metadata["hook_name"] == hook and metadata["model_name"] == "dense+moe"
    assert metadata["store_fingerprint"] == store_fingerprint(ActivationStore(micro_run / "store"))
    tokenizer = load_tokenizer(micro_run / "data" / "tokenizer")
    assert metadata["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert metadata["dataset_path"] == "crossdiff-store:" + metadata["store_fingerprint"]
    assert metadata["context_size"] == 128


@pytest.mark.slow  # shares micro_run, a whole micro run
def test_inspect_latent_example_reads_the_run(micro_run: Path):
    result = run_example("examples/inspect_latent.py", str(micro_run), "--contexts", "3")
    assert "class" in result.stdout and "top" in result.stdout
    assert result.stdout.count("[[") >= 1  # at least one context with its top token marked


@pytest.mark.slow  # shares micro_run, a whole micro run
def test_rerun_skips_finished_stages_and_redoes_changed_ones(micro_run: Path, tmp_path, capsys):
    before = comparable(micro_run / "report" / "report.json")
    summary = run_pipeline(micro_run, "micro", device="cpu")
    assert summary.skipped == ["data", "models", "store", "crosscoder"]
    assert comparable(micro_run / "report" / "report.json") == before
    # a changed option redoes its stage and the stages after it (on a copy: micro_run is shared)
    changed = tmp_path / "changed"
    shutil.copytree(micro_run, changed)
    overrides = {"store": {"n_tokens": 9_000}}
    summary = run_pipeline(changed, "micro", overrides=overrides, device="cpu")
    assert summary.skipped == ["data", "models"]
    assert "n_tokens: 12000 -> 9000" in capsys.readouterr().out


SEEDS = {"model_seeds": {"n": 2}, "replicates": {"crosscoder_seeds": 2}}


@pytest.mark.slow
def test_model_and_crosscoder_seeds_extend_a_finished_run_and_the_report_judges_them(
    micro_run: Path, tmp_path: Path
):
    """`--model-seeds 2 --crosscoder-seeds 2` on a finished run: the main stages are reused, the
    second model seed differs from the first only by its init seed, and report.json carries
    the seed stability, the per-class counts at the three splits with intervals over model
    seeds, the permutation null and the verdicts (cannot tell: N = 2 cannot reach p = 0.05)."""
    import torch
    from safetensors.torch import load_file

    from crossdiff.crosscoder import CrossCoder

    out = tmp_path / "run"
    shutil.copytree(micro_run, out)
    main = json.loads((micro_run / "report" / "report.json").read_text())["summary"]
    result = run_example(
        "-m", "crossdiff", "run", "--preset", "micro", "--out", str(out), "--device", "cpu",
        "--model-seeds", "2", "--crosscoder-seeds", "2",
    )  # fmt: skip
    for stage in ("data", "models", "store", "crosscoder"):
        assert f"[crossdiff] {stage}: already done" in result.stdout
    assert "[crossdiff] joint-crosscoder-seed1: running into" in result.stdout
    report = json.loads((out / "report" / "report.json").read_text())
    summary = report["summary"]
    assert summary["class_counts"] == main["class_counts"]  # the main crosscoder is the same

    replicates = summary["replicates"]
    assert replicates["seeds"] == [0, 1]
    seed0, seed1 = CrossCoder.load(out / "crosscoder"), CrossCoder.load(out / "crosscoder-seed1")
    assert not torch.allclose(seed0.W_dec, seed1.W_dec)  # another crosscoder seed
    st = replicates["seed_stability"]
    assert st["method"] == "hungarian" and st["n_seeds"] == 2
    shares = [st["share_matched"][t]["all"]["mean"] for t in ("0.5", "0.7", "0.9")]
    assert 0 <= shares[2] <= shares[1] <= shares[0] <= 1
    assert st["n_stable"]["all"] == len(st["stable_latents"])
    stable_col = [row["stable"] for row in report["latents"]]
    assert sum(stable_col) == st["n_stable"]["all"]
    listed = sorted(i for ids in st["stable_by_class"].values() for i in ids)
    assert listed == st["stable_latents"]

    arch = summary["architectures"]
    assert arch["architectures"] == {"dense": ["dense", "dense2"], "moe": ["moe", "moe2"]}
    assert arch["n_model_seeds"] == 2 and arch["n_crosscoder_seeds"] == 2
    joint = CrossCoder.load(out / "joint-crosscoder")
    assert joint.cfg.n_models == 4
    assert list(arch["splits"]) == ["0.3/0.7", "0.2/0.8", "0.1/0.9"]
    for split in arch["splits"].values():
        counts = split["class_counts"]
        assert sum(c["value"] for c in counts.values()) == joint.cfg.d_sae
        for est in counts.values():
            assert est["ci"][0] <= est["value"] <= est["ci"][1]
            assert len(est["per_fit"]) == 2
        claim = next(c for c in split["claims"] if c["key"] == "b_fewer_unique")
        assert claim["permutation"]["n_splits"] == 6
        assert claim["verdict"] == "cannot tell" and "1/6" in claim["reason"]
    md = (out / "report" / "report.md").read_text()
    assert "## Robustness: splits, model seeds and crosscoder seeds" in md
    assert "permutation p" in md
    assert (out / "report" / "seed_stability.png").exists()

    # the second model seed: the run's batches (seed 0), another initialization
    seed_eval = json.loads((out / "models-seed1" / "eval.json").read_text())
    assert seed_eval["training"]["seed"] == 0
    assert seed_eval["training"]["init_seed"] == 1000
    main_dense = load_file(next((out / "models" / "dense").glob("*.safetensors")))
    other_dense = load_file(next((out / "models-seed1" / "dense").glob("*.safetensors")))
    embed = next(k for k in main_dense if "embed" in k)
    assert not torch.allclose(main_dense[embed], other_dense[embed])

    # a re-run with the same options reuses every stage, the new ones included
    again = run_pipeline(out, "micro", overrides=SEEDS, device="cpu")
    assert len(again.skipped) == 9 and "joint-crosscoder-seed1" in again.skipped


def test_controls_flag_says_what_replaced_it(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "crossdiff", "run", "--preset", "micro", "--out",
         str(tmp_path / "r"), "--controls"],
        cwd=REPO, env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--model-seeds" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def _run_until(out: Path, marker_glob: str, stage: str) -> bool:
    """Start `crossdiff run --preset micro`; SIGKILL its whole process group as soon as a file
    matching `marker_glob` appears under `out`. True if it was killed while `stage` was running:
    before the run finished and before the stage wrote its record of completion."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossdiff", "run", "--preset", "micro", "--out", str(out),
         "--device", "cpu"],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    while proc.poll() is None:
        if any(out.glob(marker_glob)):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return not (out / stage / RECORD).exists()
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_run_killed_at_several_stages_finishes_with_the_same_report(micro_run, tmp_path):
    out = tmp_path / "run"
    markers = {
        "models": "models/checkpoints/*/checkpoint.safetensors",  # mid language-model training
        "store": "store/shard_00000.safetensors",  # mid harvest
        "crosscoder": "crosscoder/checkpoints/state_*.safetensors",  # mid crosscoder training
    }
    killed = {stage: _run_until(out, marker, stage) for stage, marker in markers.items()}
    assert killed["models"], "the first run finished before it could be interrupted"
    missed = [stage for stage, interrupted in killed.items() if not interrupted]
    assert not missed, f"the runs were not interrupted in stages {missed} (each must be)"
    run_pipeline(out, "micro", device="cpu")
    assert comparable(out / "report" / "report.json") == comparable(
        micro_run / "report" / "report.json"
    )


def test_unknown_preset_and_stage_are_clear_errors():
    with pytest.raises(CrossdiffError, match="known presets"):
        resolve_options("huge")
    with pytest.raises(CrossdiffError, match="unknown stage"):
        resolve_options("micro", {"training": {"steps": 1}})


@pytest.mark.slow  # about 50 s
def test_bring_your_own_models_example_runs_at_reduced_size(tmp_path):
    result = run_example("examples/bring_your_own_models.py", "--out", str(tmp_path), "--quick")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    # a HookedTransformer and a Hugging Face GPT-2 through TransformerBridge, named by the caller
    assert report["summary"]["model_names"] == ["hooked", "hf"]
    assert {"hooked-only", "hf-only", "shared"} <= set(report["summary"]["class_counts"])
    assert report["summary"]["domains"]["recorded"]  # plain token rows with a domain per row
    assert "open" in result.stdout


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message given without a GPU"
)
def test_paper_replication_example_says_it_needs_a_gpu():
    result = subprocess.run(
        [sys.executable, "examples/paper_replication.py", "--out", "unused"],
        cwd=REPO, env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr
