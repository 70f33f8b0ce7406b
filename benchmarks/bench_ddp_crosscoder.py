"""Crosscoder training throughput of 2 data-parallel processes (torchrun, gloo) against 1 process,
side by side in one run, at the tiny preset's crosscoder shape.

Three configurations train the same crosscoder on the same activations with the same global
batch: one process with 1 thread (the per-core baseline), one process with as many threads as
the 2-process run has in all (the fair single-process alternative), and 2 processes with 1 thread
each under torchrun. Throughput is trained tokens over the time inside SAETrainer.fit (start-up and
imports excluded). Writes benchmarks/out/bench_ddp_crosscoder.json.

    .venv/bin/python benchmarks/bench_ddp_crosscoder.py            # 300 steps each
    .venv/bin/python benchmarks/bench_ddp_crosscoder.py --quick    # 60 steps each
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "out" / "bench_ddp_crosscoder.json"


def job(args: argparse.Namespace) -> None:
    """One training run (in each rank when launched by torchrun); rank 0 writes the figures."""
    import torch

    from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
    from crossdiff.crosscoder.synthetic import planted_crosscoder_data
    from crossdiff.plumbing.distributed import dist_info, finish_distributed, init_distributed

    torch.set_num_threads(args.threads)
    init_distributed()
    d = args.d_model
    acts, _ = planted_crosscoder_data(
        args.tokens, d, 4 * d, 2 * d, 2 * d, densities=(0.002, 0.05), noise=0.2, seed=0
    )
    cfg = CrossCoderConfig(d_model=d, d_sae=args.expansion * d, k=args.k)
    cc = train_crosscoder(
        acts, cfg, steps=args.steps, batch_size=args.batch_size, seed=0, log_every=10**9
    )
    info = dist_info()
    if info.is_main:
        summary = cc.training_summary
        Path(args.result).write_text(
            json.dumps(
                {
                    "tokens_per_second": summary["tokens_per_second"],
                    "train_seconds": summary["train_seconds"],
                    "world_size": info.world_size,
                    "threads_per_process": args.threads,
                    "final_mse": summary["history"][-1]["mse"],
                }
            )
        )
    finish_distributed()


def launch(args: argparse.Namespace, nproc: int, threads: int, result: Path) -> dict:
    job_args = [
        __file__, "--job", "--result", str(result), "--threads", str(threads),
        "--steps", str(args.steps), "--tokens", str(args.tokens), "--d-model", str(args.d_model),
        "--expansion", str(args.expansion), "--k", str(args.k),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if nproc == 1:
        command = [sys.executable, *job_args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *job_args,
        ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    subprocess.run(command, env=env, check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=float, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    if args.job:
        job(args)
        return
    if args.quick:
        args.steps, args.tokens = 60, 65_536
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "1 process, 1 thread": launch(args, 1, 1, Path(tmp) / "a.json"),
            f"1 process, {args.nproc} threads": launch(args, 1, args.nproc, Path(tmp) / "b.json"),
            f"{args.nproc} processes, 1 thread each": launch(
                args, args.nproc, 1, Path(tmp) / "c.json"
            ),
        }
    names = list(runs)
    ddp = runs[names[2]]["tokens_per_second"]
    ratios = {
        f"{names[2]} / {names[0]}": ddp / runs[names[0]]["tokens_per_second"],
        f"{names[2]} / {names[1]}": ddp / runs[names[1]]["tokens_per_second"],
    }
    for name, run in runs.items():
        print(
            f"{name:32s} {run['tokens_per_second']:10.0f} tok/s  (final mse {run['final_mse']:.4g})"
        )
    for name, ratio in ratios.items():
        print(f"speed-up {name}: {ratio:.2f}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("job", "result", "threads")}
    record = {
        "runs": runs,
        "ratios": ratios,
        "settings": settings,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    OUT.write_text(json.dumps(record, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
