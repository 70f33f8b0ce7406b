"""`crossdiff run --preset micro --architecture dfc` end to end: the crosscoder is a DFC, the
report's classes come from its partition (relative-norm view beside them), and screen-and-verify
writes its columns, its per-class verified share and the explorer's records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # a whole micro run (20-40 s on 2 idle cores)
def test_micro_run_with_a_dfc_reports_partition_classes_and_verification(tmp_path: Path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "crossdiff", "run", "--preset", "micro", "--architecture", "dfc",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = json.loads((out / "crosscoder" / "cfg.json").read_text())
    d_sae = cfg["d_sae"]
    n_excl = max(1, int(d_sae * 0.05))
    assert cfg["partition"] == [n_excl, n_excl]
    report = json.loads((out / "report" / "report.json").read_text())
    summary, latents = report["summary"], report["latents"]
    part = summary["partition"]
    assert part["architecture"] == "dfc" and part["exclusive"] == [n_excl, n_excl]
    assert part["class_counts"] == summary["class_counts"]
    for row in latents:  # classes from the partition
        if row["class"] != "dead":
            expected = {"shared": "shared", "dense": "dense-only", "moe": "moe-only"}
            assert row["class"] == expected[row["partition"]], row
        assert "class_relative_norm" in row
    for col in ("verify_candidate", "verified", "verify_ablation_kl", "verify_steering_kl_control"):
        assert col in report["columns"]
    verification = summary["verification"]
    candidates = [row for row in latents if row["verify_candidate"]]
    assert candidates and all(row["class"] in ("dense-only", "moe-only") for row in candidates)
    assert verification["settings"] == {"n_candidates_per_class": 2, "max_sequences": 8}
    for cls, block in verification["per_class"].items():
        assert cls in ("dense-only", "moe-only")
        assert block["n_candidates"] >= 1 and 0 <= block["n_verified"] <= block["n_candidates"]
        lo, hi = block["interval_95"]
        assert 0 <= lo <= block["share_verified"] <= hi <= 1
    assert sum(b["n_candidates"] for b in verification["per_class"].values()) == len(candidates)
    explorer = json.loads((out / "report" / "explorer.json").read_text())
    verified_entries = [e for e in explorer["latents"].values() if "verify" in e]
    assert verified_entries and "steering_logits_own" in verified_entries[0]["verify"]
