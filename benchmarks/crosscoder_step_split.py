"""Where crossdiff's training step goes at one shape, with and without the dead-latent (aux) loss.

    .venv/bin/python benchmarks/crosscoder_step_split.py 2048 8 32 1024 --steps 4 --threads 2

Arguments as a sweep point's name: inputs per model, expansion, k, batch. Prints the step's phases
(ms, the steps after the first) as bench_crosscoder --sweep splits them, for the trainer's default
aux loss and for aux_loss_coefficient 0, and with --ops the top operators of the default step."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.crosscoder_sweep import PhaseClock, phase_timers  # noqa: E402
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("inputs", "expansion", "k", "batch"):
        parser.add_argument(name, type=int)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ops", action="store_true", help="also profile the operators")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d_in = 2 * args.inputs
    acts = torch.randn(max(16384, 4 * args.batch), 2, args.inputs, generator=torch.Generator())
    cfg = CrossCoderConfig(n_models=2, d_model=args.inputs, d_sae=args.expansion * d_in, k=args.k)
    options = {"steps": args.steps, "batch_size": args.batch, "log_every": 10**9}
    for aux in (None, 0.0):
        clock = PhaseClock()
        with phase_timers(clock, "crossdiff"):
            train_crosscoder(acts, cfg, aux_loss_coefficient=aux, **options)
        n = clock.steps - 1
        phases = {p: round(v / n * 1e3) for p, v in clock.totals.items()}
        label = "default aux loss" if aux is None else "aux_loss_coefficient 0"
        print(f"{label}: {clock.step_ms():.0f} ms a step; {phases}", flush=True)
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_crosscoder(acts, cfg, **options)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
