"""examples/bridge_dense_vs_moe.py --quick: a Bridge dense model against a Bridge MoE from local
Hugging Face folders (random weights) to a report with expert attribution, logit effects and the
spliced-in loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about a minute: two Bridges, a crosscoder and a report
def test_bridge_example_reports_expert_attribution(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "examples/bridge_dense_vs_moe.py", "--out", str(tmp_path), "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    experts = report["summary"]["experts"]
    assert experts["recorded"] and experts["n_experts_per_layer"] == [4, 4]
    assert "latents attributed to an expert" in result.stdout
    assert set(report["summary"]["spliced_loss"]["models"]) == {"dense", "moe"}
    explorer = json.loads((tmp_path / "report" / "explorer.json").read_text())
    assert set(explorer["logit_models"]) == {"dense", "moe"}
    store = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert store["experts"]["router_hooks"]["blocks.1.mlp.hook_expert_indices"] == (
        "blocks.1.mlp.gate.hook_out"
    )
