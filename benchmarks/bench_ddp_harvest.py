"""Harvest throughput of 1 vs 2 processes under torchrun (gloo, CPU, one torch thread each).

    python benchmarks/bench_ddp_harvest.py          # 256 rows (32,512 tokens) a process, best of 3
    python benchmarks/bench_ddp_harvest.py --quick  # 64 rows (8,128 tokens) a process, 1 round

Weak scaling: each process harvests the same number of rows (N processes harvest N times the
tokens, in whole batches, so the split is even), so the ideal is the same wall time and N times
the tokens/s. The crossdiff `tiny` models
(random weights), rows of 128 tokens, batches of 32 rows, the `paper` pairing, float16 shards.
Each launch harvests `--rounds` times into fresh stores and keeps its best round; the time of a
round runs from a barrier before `harvest(...)` to a barrier after it returns (the merge
included), so interpreter start-up and imports are not counted. The machine's other load
matters: on a machine with fewer free cores than processes the ratio says little.
Writes benchmarks/out/bench_ddp_harvest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

OUT = Path(__file__).parent / "out" / "bench_ddp_harvest.json"
SEQ_LEN = 128


def worker(rows_per_process: int, batch_size: int, rounds: int, result: Path) -> None:
    """Run by torchrun in every process."""
    import torch

    from crossdiff.activations import ActivationStore, harvest
    from crossdiff.models import build_model, dense_config, moe_config
    from crossdiff.plumbing.distributed import barrier, finish_distributed, init_distributed

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    info = init_distributed()
    torch.manual_seed(0)
    dense, moe = build_model(dense_config("tiny")).eval(), build_model(moe_config("tiny")).eval()
    n_rows = rows_per_process * info.world_size
    n_tokens = n_rows * (SEQ_LEN - 1)  # every token but BOS
    tokens = torch.randint(
        1, dense.cfg.d_vocab, (n_rows, SEQ_LEN), generator=torch.Generator().manual_seed(0)
    )
    tokens[:, 0] = 0
    times = []
    for r in range(rounds):
        out = result.parent / f"store_{info.world_size}_{r}"  # the same folder for every rank
        barrier()
        start = time.perf_counter()
        harvest(
            dense, moe, tokens, "paper", out, n_tokens=n_tokens, batch_size=batch_size,
            progress=False,
        )  # fmt: skip
        barrier()
        times.append(time.perf_counter() - start)
        assert ActivationStore(out).n_tokens == n_tokens
    if info.is_main:
        result.write_text(
            json.dumps({"world_size": info.world_size, "n_tokens": n_tokens, "seconds": times})
        )
    finish_distributed()


def launch(nproc: int, args: argparse.Namespace, result: Path) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", __file__, "--worker", str(result),
        "--rows-per-process", str(args.rows_per_process),
        "--batch-size", str(args.batch_size), "--rounds", str(args.rounds),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{nproc} processes failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 rows per process, 1 round")
    parser.add_argument("--rows-per-process", type=int, default=None, help="default 256")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows_per_process = args.rows_per_process or (64 if args.quick else 256)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.worker is not None:
        worker(args.rows_per_process, args.batch_size, args.rounds, args.worker)
        return

    OUT.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory(dir=OUT.parent) as tmp:
        for nproc in (1, 2):
            run = launch(nproc, args, Path(tmp) / f"result_{nproc}.json")
            best = min(run["seconds"])
            runs[nproc] = dict(run, best_seconds=best, tokens_per_s=run["n_tokens"] / best)
            rate = runs[nproc]["tokens_per_s"]
            print(
                f"{nproc} process{'es' if nproc > 1 else ''}: {run['n_tokens']:,} tokens in "
                f"{best:.2f} s (best of {len(run['seconds'])}) = {rate:,.0f} tokens/s"
            )
    ratio = runs[2]["tokens_per_s"] / runs[1]["tokens_per_s"]
    print(f"throughput of 2 processes / 1 process: {ratio:.2f} (ideal 2.0)")
    print(f"wall time of 2 processes (2x tokens) / 1 process: {1 / ratio * 2:.2f} (ideal 1.0)")
    report = {
        "benchmark": "bench_ddp_harvest",
        "models": "crossdiff tiny (random weights)",
        "pairing": "paper",
        "seq_len": SEQ_LEN,
        "batch_size": args.batch_size,
        "rows_per_process": args.rows_per_process,
        "threads_per_process": 1,
        "cpu_count": os.cpu_count(),
        "runs": {str(k): v for k, v in runs.items()},
        "throughput_ratio_2_over_1": ratio,
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
