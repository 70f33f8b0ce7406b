"""The tables of docs/findings.md, read from finished run folders of
`crossdiff run --model-seeds N --crosscoder-seeds C` (their report.json and the models' eval.json);
nothing is recomputed.

    .venv/bin/python benchmarks/findings_tables.py runs/tiny-n3 runs/small-n3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(run: Path) -> dict[str, Any]:
    report = json.loads((run / "report" / "report.json").read_text())["summary"]
    evals = [json.loads((run / "models" / "eval.json").read_text())]
    evals += [
        json.loads((d / "eval.json").read_text())
        for d in sorted(run.glob("models-seed*"))
        if (d / "eval.json").exists()
    ]
    return {
        "name": run.name,
        "summary": report,
        "models": evals,
        "seconds": json.loads((run / "summary.json").read_text()).get("stage_seconds", {}),
    }


def _est(e: dict[str, Any] | None) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    ci = "" if not e.get("ci") else f" [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]"
    return f"{e['value']:.3g}{ci}"


def lm_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | model seed | model | held-out CE code | science | stories |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        for seed, evals in enumerate(run["models"]):
            for model, result in evals["models"].items():
                ce = [result["domains"][d]["cross_entropy"] for d in ("code", "science", "stories")]
                cells = " | ".join(f"{v:.3f}" for v in ce)
                lines.append(f"| {run['name']} | {seed} | {model} | {cells} |")
    return lines


def classes_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | split | class | latents [95% interval over model and crosscoder seeds] |",
             "|---|---|---|---|"]  # fmt: skip
    for run in runs:
        arch = run["summary"].get("architectures")
        if not arch:
            continue
        for split, s in arch["splits"].items():
            for cls, e in s["class_counts"].items():
                lines.append(f"| {run['name']} | {split} | {cls} | {_est(e)} |")
    return lines


def claims_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | split | claim | effect [95% interval] | test | verdict |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        arch = run["summary"].get("architectures")
        if not arch:
            continue
        for split, s in arch["splits"].items():
            for c in s["claims"]:
                perm = c.get("permutation")
                test = (
                    f"p = {perm['p']:.3g} (rank {perm['rank']}/{perm['n_splits']})" if perm else ""
                )
                reason = f" ({c['reason']})" if c["reason"] else ""
                lines.append(
                    f"| {run['name']} | {split} | {c['key']} | {_est(c['estimate'])} | {test} | "
                    f"{c['verdict']}{reason} |"
                )
    return lines


def norms_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | pair | sd of r | r: 1% / 50% / 99% | range |", "|---|---|---|---|---|"]
    for run in runs:
        arch = run["summary"].get("architectures")
        for d in (arch or {}).get("relative_norms", {}).values():
            if d.get("n"):
                q = d["quantiles"]
                lines.append(
                    f"| {run['name']} | {' vs '.join(d['models'])} | {d['sd']:.3f} | "
                    f"{q['q01']:.3f} / {q['q50']:.3f} / {q['q99']:.3f} | "
                    f"[{d['min']:.3f}, {d['max']:.3f}] |"
                )
    return lines


def stability_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | class (main pair) | live latents | matched at 0.5 / 0.7 / 0.9 | stable |",
             "|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        st = (run["summary"].get("replicates") or {}).get("seed_stability")
        if not st:
            continue
        for cls, n in st["n_live"].items():
            shares = " / ".join(
                f"{st['share_matched'][t][cls]['mean']:.2f}" for t in ("0.5", "0.7", "0.9")
            )
            lines.append(f"| {run['name']} | {cls} | {n} | {shares} | {st['n_stable'][cls]} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    args = parser.parse_args()
    runs = [_load(run) for run in args.runs]
    for title, table in (
        ("Language models (held-out cross-entropy, nats)", lm_table(runs)),
        ("Latents attributed over model seeds", classes_table(runs)),
        ("Claims over model seeds", claims_table(runs)),
        ("Relative norms in the joint crosscoder", norms_table(runs)),
        ("Seed stability (main pair's crosscoder seeds)", stability_table(runs)),
    ):
        print(f"\n### {title}\n")
        print("\n".join(table))
    for run in runs:
        arch = run["summary"].get("architectures") or {}
        fve = run["summary"]["reconstruction"]
        seconds = sum(run["seconds"].values())
        print(
            f"\n{run['name']}: headline {arch.get('headline')}; main-pair seed-0 FVE per model "
            f"{fve['fve_per_model']}; stage seconds of the last invocation {seconds:.0f}"
        )


if __name__ == "__main__":
    main()
