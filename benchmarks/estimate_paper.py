"""Expected time, memory and disk of each stage of `--preset paper` on one GPU, from counted
FLOPs and bytes (not measured). The model is crossdiff.run.estimate (its docstring gives the
counting rules); `crossdiff run` prints the same table before it starts. Prints a markdown table
(the one in docs/distributed.md) and writes benchmarks/out/estimate_paper.json.

    .venv/bin/python benchmarks/estimate_paper.py                        # H100 SXM figures
    .venv/bin/python benchmarks/estimate_paper.py --gpu H200
    .venv/bin/python benchmarks/estimate_paper.py --tflops 989 --mfu 0.4 --hbm-tbs 3.35
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from crossdiff.run.estimate import GB, as_json, estimate_run, gpu_spec, store_bytes
from crossdiff.run.pipeline import resolve_options

OUT = Path(__file__).parent / "out" / "estimate_paper.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gpu", default="H100", help="a GPU name in crossdiff.run.estimate.GPU_PEAKS"
    )
    parser.add_argument("--tflops", type=float, default=None, help="dense bf16 peak, TFLOP/s")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of peak achieved")
    parser.add_argument("--hbm-tbs", type=float, default=None, help="GPU memory bandwidth, TB/s")
    parser.add_argument("--disk-gbs", type=float, default=2.0, help="disk bandwidth, GB/s")
    parser.add_argument(
        "--step-overhead-ms",
        type=float,
        default=2.0,
        help="host time per crosscoder step (Python, ~100 kernel launches), ms",
    )
    parser.add_argument("--harvest-tokens", type=int, default=None, help="store size, tokens")
    args = parser.parse_args()

    spec = gpu_spec(args.gpu, mfu=args.mfu)
    spec = replace(
        spec,
        peak_tflops=args.tflops or spec.peak_tflops,
        hbm_tbs=args.hbm_tbs or spec.hbm_tbs,
        disk_gbs=args.disk_gbs,
        step_overhead_ms=args.step_overhead_ms,
    )
    options = resolve_options("paper", {"store": {"n_tokens": args.harvest_tokens}})
    stages = estimate_run(options, spec)
    print(
        f"assumed: {spec.name}, {spec.peak_tflops:.0f} TFLOP/s bf16 peak at {spec.mfu:.0%} "
        f"utilisation, {spec.hbm_tbs} TB/s HBM, {spec.disk_gbs} GB/s disk, "
        f"{spec.step_overhead_ms} ms host time per crosscoder step; "
        f"store {store_bytes(options) / GB:.0f} GB\n"
    )
    print("| stage | tokens | FLOPs | GPU memory | disk | expected time | bound by |")
    print("|---|---|---|---|---|---|---|")
    for name, e in stages.items():
        when = "not predicted" if e.seconds is None else f"{e.seconds / 60:.1f} min"
        print(
            f"| {name} | {e.tokens:.3g} | {e.flops:.3g} | {e.memory_bytes / GB:.1f} GB | "
            f"{e.disk_bytes / GB:.1f} GB | {when} | {e.bound} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(as_json(stages, spec), indent=2))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
