"""The device check (`benchmarks/gpu_check.sh`) at micro size on the CPU: one command runs every
stage and writes one JSON file whose figures are finite and consistent with each other."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _numbers(tree, where=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{where}.{key}")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield where, tree


@pytest.mark.slow
def test_micro_device_check_writes_finite_consistent_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CROSSDIFF_GPU_CHECK_MICRO": "1",  # the env-var form of --micro
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--json", str(out)]
        + ["--moe-repeats", "2", "--work", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "=== device check on cpu" in done.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "micro"
    figures = dict(_numbers({k: v for k, v in result.items() if k != "options"}))
    assert len(figures) > 40
    bad = {k: v for k, v in figures.items() if not math.isfinite(v)}
    assert not bad

    stages = result["stages"]
    assert list(stages) == ["data", "models", "store", "crosscoder", "report"]
    peak = result["device"]["peak_tflops"] * 1e12
    assert peak > 0
    for name in ("models", "store", "crosscoder", "report"):
        s = stages[name]
        assert s["seconds"] > 0 and s["tokens"] > 0 and s["flops"] > 0
        assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["seconds"])
        assert s["mfu"] == pytest.approx(s["flops"] / s["seconds"] / peak)
        assert s["predicted_seconds"] > 0
    # micro: two models of 30 steps x 8 rows x 128 tokens; a 12,000-token store
    assert stages["models"]["tokens"] == 2 * 30 * 8 * 128
    assert stages["store"]["tokens"] == 12_000
    assert stages["crosscoder"]["tokens"] == 60 * 256
    # the store's files: 12,000 tokens x 2 models x 128 x float16, plus metadata and stats
    assert 12_000 * 2 * 128 * 2 <= stages["store"]["disk_gb"] * 1e9 < 3 * 12_000 * 2 * 128 * 2
    assert result["disk_used_gb"] >= sum(s["disk_gb"] for s in stages.values()) * 0.999
    moe = result["moe_layer"]
    assert moe["crossdiff_tokens_per_s"] > 0 and moe["stock_tokens_per_s"] > 0
    assert moe["grouped_mm"] == 0.0  # the CPU runs the float32 path...
    assert moe["relative_difference"] < 1e-5  # ...which equals stock's
