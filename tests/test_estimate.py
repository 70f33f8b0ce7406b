"""The time and disk model `crossdiff run` prints before it starts, and its disk refusal."""

from __future__ import annotations

from collections import namedtuple

import pytest

from crossdiff.plumbing.common import CrossdiffError
from crossdiff.run import estimate
from crossdiff.run.estimate import GIB, check_disk, estimate_run, gpu_spec, store_bytes
from crossdiff.run.pipeline import resolve_options, run_pipeline

Usage = namedtuple("Usage", "total used free")


def _disk_of(monkeypatch, free_bytes: int) -> None:
    monkeypatch.setattr(
        estimate.shutil, "disk_usage", lambda path: Usage(free_bytes, 0, free_bytes)
    )


def test_paper_store_is_about_307_gb():
    options = resolve_options("paper")
    activations = 100_000_000 * 2 * 768 * 2  # tokens x models x d_model x bf16
    assert activations == 307_200_000_000
    size = store_bytes(options)
    assert activations < size < activations * 1.01  # plus the per-token metadata
    assert store_bytes(resolve_options("paper", {"store": {"n_tokens": 10_000_000}})) == size // 10


def test_paper_on_h100_matches_the_counted_figures():
    stages = estimate_run(resolve_options("paper"), gpu_spec("NVIDIA H100 80GB HBM3"))
    # two models of 2.6B tokens at 40% of 989 TFLOP/s: ~62 min each
    assert 115 * 60 < stages["models"].seconds < 130 * 60
    assert stages["store"].bound == "disk"
    assert 4 * 60 < stages["store"].seconds < 6 * 60  # 2 x 307 GB at 2 GB/s
    assert stages["crosscoder"].seconds < 3 * 60
    assert stages["data"].seconds is None  # download-bound: not predicted


def test_gpu_table():
    assert gpu_spec("NVIDIA H200").hbm_tbs == 4.8
    assert gpu_spec("NVIDIA A100-SXM4-80GB").peak_tflops == 312.0
    unknown = gpu_spec("Some Future GPU")
    assert unknown.peak_tflops < 312.0  # conservative


def test_paper_store_is_refused_on_a_64_gib_disk(tmp_path, monkeypatch):
    _disk_of(monkeypatch, 64 * GIB)
    stages = estimate_run(resolve_options("paper"), gpu_spec("NVIDIA H200"))
    with pytest.raises(CrossdiffError, match="--activations live") as err:
        check_disk(tmp_path / "run", stages)
    assert "309.6 GB" in str(err.value) and "68.7 GB free" in str(err.value)
    # one model seed's 10M-token store (31 GB) fits on the same disk; three such stores do not
    overrides = {"store": {"n_tokens": 10_000_000}, "model_seeds": {"n": 1}}
    small = estimate_run(resolve_options("paper", overrides), gpu_spec("NVIDIA H200"))
    assert 30e9 < check_disk(tmp_path / "run", small) < 60e9
    three = estimate_run(
        resolve_options("paper", {"store": {"n_tokens": 10_000_000}}), gpu_spec("NVIDIA H200")
    )
    with pytest.raises(CrossdiffError, match="more disk"):
        check_disk(tmp_path / "run", three)


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_micro_and_tiny_fit(tmp_path, monkeypatch, preset):
    _disk_of(monkeypatch, 64 * GIB)
    stages = estimate_run(resolve_options(preset), estimate.device_spec("cpu", cpu_tflops=0.05))
    needed = check_disk(tmp_path, stages)
    # tiny's store holds the whole corpus: 2M tokens x 2 models x 128 float16 values = 1.0 GB
    assert 0 < needed < 2e9
    assert all(e.seconds is not None and e.seconds >= 0 for e in stages.values())


def test_files_already_written_count_as_written(tmp_path, monkeypatch):
    stages = estimate_run(resolve_options("micro"), estimate.device_spec("cpu", cpu_tflops=0.05))
    total = sum(e.disk_bytes for e in stages.values())
    (tmp_path / "blob").write_bytes(b"\0" * 1_000_000)
    assert check_disk(tmp_path, stages) == total - 1_000_000
    _disk_of(monkeypatch, total // 2)  # the margin is 10% + 2 GiB: nothing fits in this
    with pytest.raises(CrossdiffError, match="more disk"):
        check_disk(tmp_path, stages)


def test_run_refuses_before_making_the_folder(tmp_path, monkeypatch, capsys):
    _disk_of(monkeypatch, 64 * GIB)
    out = tmp_path / "paper-run"
    with pytest.raises(CrossdiffError, match="--activations live"):
        run_pipeline(out, "paper", device="cpu", activations="store")  # asked for a store
    assert not out.exists()
    printed = capsys.readouterr().out
    assert "store" in printed and "309.60 GB" in printed  # the per-stage table came first


def test_a_run_that_stops_before_the_store_needs_no_room_for_it(tmp_path, monkeypatch, capsys):
    from crossdiff.run import pipeline

    _disk_of(monkeypatch, 64 * GIB)
    options = resolve_options("paper")
    pipeline._print_estimates(tmp_path / "run", options, "cpu", "models")  # no error
    printed = capsys.readouterr().out
    assert "models" in printed and "309.60" not in printed
    with pytest.raises(CrossdiffError, match="--activations live"):
        pipeline._print_estimates(tmp_path / "run", options, "cpu", "store")
