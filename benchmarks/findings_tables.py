"""The tables of docs/findings.md, read from finished run folders of
`crossdiff run --controls --crosscoder-seeds N` (their report.json and the models' eval.json);
nothing is recomputed.

    .venv/bin/python benchmarks/findings_tables.py runs/tiny runs/small
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(run: Path) -> dict[str, Any]:
    report = json.loads((run / "report" / "report.json").read_text())["summary"]
    models = json.loads((run / "models" / "eval.json").read_text())
    controls = run / "control-models" / "eval.json"
    return {
        "name": run.name,
        "summary": report,
        "models": models,
        "control_models": json.loads(controls.read_text()) if controls.exists() else None,
        "seconds": json.loads((run / "summary.json").read_text()).get("stage_seconds", {}),
    }


def _spread(s: dict[str, Any] | None, digits: int = 1) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    values = ", ".join(f"{v:.{digits}f}" if v is not None else "n/a" for v in s["values"])
    sd = f" ± {s['sd']:.{digits}f}" if s.get("sd") is not None else ""
    return f"{s['mean']:.{digits}f}{sd} ({values})"


def _interval(ci: list[float] | None) -> str:
    return "n/a" if not ci else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def lm_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| run | model | held-out CE code | science | stories |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        for which, evals in (("", run["models"]), (" (control)", run["control_models"])):
            if evals is None:
                continue
            for model, result in evals["models"].items():
                ce = [result["domains"][d]["cross_entropy"] for d in ("code", "science", "stories")]
                cells = " | ".join(f"{v:.3f}" for v in ce)
                lines.append(f"| {run['name']} | {model}{which} | {cells} |")
    return lines


def pairs_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| run | pair | A-only | B-only | FVE (pooled, raw) | median density: A-only / B-only / "
        "shared |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        controls = run["summary"].get("controls")
        if not controls:
            continue
        for role, pair in controls["pairs"].items():
            a, b = pair["A"], pair["B"]
            ex, dens = pair["exclusive"], pair["density_median"]
            density = " / ".join(_spread(dens[c], 4) for c in (f"{a}-only", f"{b}-only", "shared"))
            lines.append(
                f"| {run['name']} | {a} vs {b} ({role}) | {_spread(ex[f'{a}-only'])} | "
                f"{_spread(ex[f'{b}-only'])} | {_spread(pair['fve'], 3)} | {density} |"
            )
    return lines


def claims_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| run | claim | within the main pair (seed 0) | beyond controls: effect | 95% interval "
        "| verdict |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        summary = run["summary"]
        within = {c["key"]: c for c in summary["claims"]}
        for claim in (summary.get("controls") or {}).get("claims", []):
            own = within[claim["key"]]
            effect = "n/a" if claim["effect"] is None else f"{claim['effect']:.3g}"
            own_effect = "n/a" if own["effect"] is None else f"{own['effect']:.3g}"
            lines.append(
                f"| {run['name']} | {claim['key']} | {own['verdict']} ({own_effect}, "
                f"CI {_interval(own['ci'])}) | {effect} | {_interval(claim['ci'])} | "
                f"{claim['verdict']} |"
            )
    return lines


def seeds_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| run | class | count per seed: mean ± sd (values) | stable across all seeds |",
        "|---|---|---|---|",
    ]
    for run in runs:
        replicates = run["summary"].get("replicates")
        if not replicates:
            continue
        stability = replicates.get("stability") or {}
        for cls, spread in replicates["figures"]["class_counts"].items():
            stable = stability.get(cls, {}).get("fraction")
            lines.append(f"| {run['name']} | {cls} | {_spread(spread)} | {_spread(stable, 2)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    args = parser.parse_args()
    runs = [_load(run) for run in args.runs]
    for title, table in (
        ("Language models (held-out cross-entropy, nats)", lm_table(runs)),
        ("Pairs (per crosscoder seed)", pairs_table(runs)),
        ("Claims", claims_table(runs)),
        ("Crosscoder seeds (main pair)", seeds_table(runs)),
    ):
        print(f"\n### {title}\n")
        print("\n".join(table))
    for run in runs:
        fve = run["summary"]["reconstruction"]
        seconds = sum(run["seconds"].values())
        print(
            f"\n{run['name']}: seed-0 FVE per model {fve['fve_per_model']}, pooled normalized "
            f"{fve.get('fve_pooled_normalized')}; stage seconds of the last invocation "
            f"{seconds:.0f}"
        )


if __name__ == "__main__":
    main()
