"""The shape sweep of bench_crosscoder.py (--sweep): crossdiff's crosscoder vs SAELens's
BatchTopKTrainingSAE on the concatenated activations, at a grid of shapes.

Each point: the same planted activations, d_sae, k, batch, steps and trainer settings for both
(bench_crosscoder.train_saelens); runs interleaved (crossdiff, SAELens, crossdiff, ...) so that a
busy machine slows both alike; samples/s is the median of --repeats runs. Then one more run of
each with phase timers, which split the step into selection, encode, decode, aux (the dead-latent
loss), backward, optimizer (clipping, Adam, zero_grad) and bookkeeping (everything else: data,
counters, threshold, logging), over the steps after the first (whose selection has no threshold
yet, and which pays first calls); samples/s counts every step. The timers wrap methods on the
classes for that run only (see `phase_timers`), so the normal path carries no instrumentation. On
the CPU every op is synchronous, so wall time around a call is that call's time.

FLOP floor: the matmul FLOPs of the step at this machine's GEMM rate, measured in the same run on
a [batch, d_in] x [d_in, d_sae] GEMM. crossdiff's step needs the dense encoder GEMM (to score every
latent) and the sparse parts (decode, its backward, the encoder's sparse gradient: 8 * batch * k
* d_in); SAELens's dense step five GEMMs of the encoder's size. `floor_fraction` = floor / step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

INPUTS = (64, 128, 768, 2048)  # per model; 2 models
EXPANSIONS = (8, 32)  # d_sae = expansion * d_in, d_in = 2 * inputs
KS = (6, 32, 300)
BATCHES = (1024, 4096)
PHASES = ("selection", "encode", "decode", "aux", "backward", "optimizer", "bookkeeping")
DEFAULT_STEPS = 300
MIN_STEPS = 8


def grid() -> list[dict[str, Any]]:
    points = []
    for d in INPUTS:
        for e in EXPANSIONS:
            for k in KS:
                if k * 8 > 2 * d * e:  # at most 1/8 of the latents active
                    continue
                points += [point(d, e, k, b) for b in BATCHES]
    return points


def select(points: list[dict[str, Any]], spec: str) -> list[dict[str, Any]]:
    small = [p for p in points if p["inputs"] <= 128 and p["k"] <= 32]
    named = {
        "small": small,
        "medium": [p for p in points if p["inputs"] <= 768],
        "large": [p for p in points if p["inputs"] >= 768],
        "all": points,
    }
    if spec in named:
        return named[spec]
    chosen = []
    for name in spec.split(","):  # any shape, on the grid or not
        found = re.fullmatch(r"(\d+)x(\d+)k(\d+)b(\d+)", name.strip())
        if not found:
            raise SystemExit(f"point {name!r}: expected a name like {points[0]['name']}")
        d, e, k, b = map(int, found.groups())
        chosen.append(point(d, e, k, b))
    return chosen


def point(d: int, e: int, k: int, b: int) -> dict[str, Any]:
    """inputs d per model (2 models), d_sae = e * d_in, k, batch b."""
    return {"name": f"{d}x{e}k{k}b{b}", "inputs": d, "expansion": e, "d_in": 2 * d,
            "d_sae": 2 * d * e, "k": k, "batch": b}  # fmt: skip


def state_gib(p: dict[str, Any]) -> float:
    """Weights, gradients and Adam moments of encoder and decoder, plus ~8 [batch, d_sae]."""
    return (8 * p["d_in"] * p["d_sae"] + 8 * p["batch"] * p["d_sae"]) * 4 / 2**30


def gemm_rate(batch: int, d_in: int, d_sae: int, repeats: int = 5) -> float:
    """FLOP/s of the step's encoder-sized GEMM on this machine, now (median of `repeats`)."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * batch * d_in * d_sae / statistics.median(times)


def floors(p: dict[str, Any], rate: float) -> dict[str, float]:
    gemm = 2 * p["batch"] * p["d_in"] * p["d_sae"]
    sparse = 8 * p["batch"] * p["k"] * p["d_in"]
    return {"crossdiff": (gemm + sparse) / rate, "saelens": 5 * gemm / rate}


def estimated_step_s(p: dict[str, Any], rate: float) -> float:
    """A rough step time of one contender (for planning only): the dense step's GEMMs plus a
    selection cost per score."""
    return floors(p, rate)["saelens"] + 15e-9 * p["batch"] * p["d_sae"]


class PhaseClock:
    """Exclusive wall time per phase: a call inside another timed call pauses the outer one; an
    `absorbing` phase (aux) keeps the time of the calls it makes."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [phase, since, absorbing]
        self.steps = 0  # optimizer steps done; the first (threshold unset, first calls) is
        self.first_end = self.last_end = 0.0  # left out: totals restart after it

    def step_done(self) -> None:
        self.steps += 1
        self.last_end = time.perf_counter()
        if self.steps == 1:
            self.totals.clear()
            self.first_end = self.last_end

    def step_ms(self) -> float:
        """Wall time per step after the first (from its end to the last step's end)."""
        return (self.last_end - self.first_end) / max(self.steps - 1, 1) * 1e3

    def wrap(self, phase: str, fn: Any, absorbing: bool = False, ends_step: bool = False) -> Any:
        clock = self

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if clock.stack and clock.stack[-1][2]:
                return fn(*args, **kwargs)
            now = time.perf_counter()
            if clock.stack:
                clock.totals[clock.stack[-1][0]] += now - clock.stack[-1][1]
            clock.stack.append([phase, now, absorbing])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                done = clock.stack.pop()
                clock.totals[done[0]] += end - done[1]
                if clock.stack:
                    clock.stack[-1][1] = end
                if ends_step:
                    clock.step_done()

        return timed


@contextlib.contextmanager
def phase_timers(clock: PhaseClock, contender: str):
    """Wrap the step's parts (class attributes, restored on exit) with `clock`'s timers."""
    from sae_lens.saes.batchtopk_sae import BatchTopK, BatchTopKTrainingSAE

    from crossdiff.crosscoder.training_sae import TrainingCrossCoder

    common = [
        (torch.Tensor, "backward", "backward"),
        (torch.nn.utils, "clip_grad_norm_", "optimizer"),
        (torch.optim.Adam, "step", "optimizer"),
        (torch.optim.Optimizer, "zero_grad", "optimizer"),
    ]
    if contender == "crossdiff":
        targets = [
            (TrainingCrossCoder, "select_batch_topk", "selection"),
            (TrainingCrossCoder, "pre_activations", "encode"),
            (TrainingCrossCoder, "selected_pre_activations", "encode"),
            (TrainingCrossCoder, "decode_sparse", "decode"),
            (TrainingCrossCoder, "aux_loss", "aux"),
        ]
    else:
        targets = [
            (BatchTopK, "forward", "selection"),
            (BatchTopKTrainingSAE, "encode_with_hidden_pre", "encode"),
            (BatchTopKTrainingSAE, "decode", "decode"),
            (BatchTopKTrainingSAE, "calculate_topk_aux_loss", "aux"),
        ]
    saved = []
    for owner, name, phase in targets + common:
        own = name in vars(owner)
        original = getattr(owner, name)
        saved.append((owner, name, own, vars(owner).get(name)))
        # Adam.step ends a training step (both trainers use Adam)
        ends = owner is torch.optim.Adam and name == "step"
        setattr(owner, name, clock.wrap(phase, original, phase == "aux", ends))
    try:
        yield clock
    finally:
        for owner, name, own, original in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def run_crossdiff(acts: torch.Tensor, p: dict[str, Any], steps: int, lr: float) -> float:
    from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder

    m, d = acts.shape[1:]
    cfg = CrossCoderConfig(n_models=m, d_model=d, d_sae=p["d_sae"], k=p["k"])
    cc = train_crosscoder(acts, cfg, steps=steps, batch_size=p["batch"], lr=lr, log_every=10**9)
    return cc.training_summary["tokens_per_second"]


def run_saelens(
    train_saelens: Any, acts: torch.Tensor, p: dict[str, Any], steps: int, lr: float
) -> float:
    ns = argparse.Namespace(d_sae=p["d_sae"], k=p["k"], batch_size=p["batch"], steps=steps)
    return train_saelens(acts, ns, lr)[1]


def measure_point(
    p: dict[str, Any],
    steps: int,
    repeats: int,
    train_saelens: Any,
    planted: Any,
    min_steps: int = MIN_STEPS,
) -> dict[str, Any]:
    from crossdiff.crosscoder import default_lr

    tokens = max(16384, min(32768, 8 * p["batch"]))
    acts = planted(argparse.Namespace(store=None, tokens=tokens, d_model=p["inputs"]))
    lr = default_lr(p["d_sae"])
    runs = {
        "crossdiff": lambda n: run_crossdiff(acts, p, n, lr),
        "saelens": lambda n: run_saelens(train_saelens, acts, p, n, lr),
    }
    for run in runs.values():  # first calls (allocation, lazy imports) outside the timing
        run(min(3, max(min_steps, 2)))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(run(steps))
    phase_steps = max(min_steps, steps // 2, 2)  # the phase split needs a step after the first
    phases = {}
    for name, run in runs.items():
        clock = PhaseClock()
        with phase_timers(clock, name):
            run(phase_steps)
        step_ms = clock.step_ms()  # steps after the first: the steady state
        split = {ph: clock.totals[ph] / (clock.steps - 1) * 1e3 for ph in PHASES[:-1]}
        split["bookkeeping"] = step_ms - sum(split.values())
        phases[name] = {"step_ms": step_ms, **{k: round(v, 3) for k, v in split.items()}}
    rate = gemm_rate(p["batch"], p["d_in"], p["d_sae"])
    floor = floors(p, rate)
    median = {name: statistics.median(r) for name, r in rates.items()}
    step_ms = {name: p["batch"] / median[name] * 1e3 for name in runs}
    return {
        **p,
        "steps": steps,
        "phase_steps": phase_steps,
        "crossdiff_samples_per_s": median["crossdiff"],
        "saelens_samples_per_s": median["saelens"],
        "ratio": median["crossdiff"] / median["saelens"],
        "pair_ratios": [a / b for a, b in zip(rates["crossdiff"], rates["saelens"], strict=True)],
        "runs": rates,
        "step_ms": step_ms,
        "phases_ms": phases,
        "gemm_gflops": rate / 1e9,
        "floor_ms": {name: f * 1e3 for name, f in floor.items()},
        "floor_fraction": {name: floor[name] * 1e3 / step_ms[name] for name in runs},
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| point | d_in | d_sae | k | batch | steps | crossdiff samples/s | SAELens samples/s "
        "| ratio | crossdiff ms/step: sel / enc / dec / aux / bwd / opt / book | SAELens ms/step: "
        "sel / enc / dec / aux / bwd / opt / book | FLOP floor fraction (crossdiff, SAELens) |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['name']} | {r['d_in']} | {r['d_sae']} | {r['k']} | {r['batch']} "
                         f"| not run: {r['skipped']} |" + " |" * 6)  # fmt: skip
            continue
        cells = []
        for name in ("crossdiff", "saelens"):
            ph = r["phases_ms"][name]
            cells.append(f"{r['step_ms'][name]:.1f}: " + " / ".join(f"{ph[x]:.1f}" for x in PHASES))
        est = " (est.)" if r.get("estimated") else ""
        ff = r["floor_fraction"]
        lines.append(
            f"| {r['name']} | {r['d_in']} | {r['d_sae']} | {r['k']} | {r['batch']} | "
            f"{r['steps']}{est} | {r['crossdiff_samples_per_s']:,.0f} | "
            f"{r['saelens_samples_per_s']:,.0f} | **{r['ratio']:.2f}x** | {cells[0]} | "
            f"{cells[1]} | {ff['crossdiff']:.2f}, {ff['saelens']:.2f} |"
        )
    return "\n".join(lines)


def run_sweep(args: argparse.Namespace, train_saelens: Any, planted: Any) -> None:
    points = select(grid(), args.points)
    default_steps = args.steps or DEFAULT_STEPS
    plan, total = [], 0.0
    for p in points:
        if state_gib(p) > args.max_gib:
            plan.append((p, 0, f"needs ~{state_gib(p):.1f} GiB > --max-gib {args.max_gib}"))
            continue
        step_s = estimated_step_s(p, gemm_rate(min(p["batch"], 1024), p["d_in"], p["d_sae"], 3))
        steps = max(args.min_steps, min(default_steps, int(args.point_seconds / step_s)))
        # both contenders: warm-up, repeats, the timed-phase run
        total += 2 * step_s * (3 + args.repeats * steps + max(args.min_steps, steps // 2, 2))
        plan.append((p, steps, None))
    print(f"sweep: {len(points)} points, {args.repeats} runs each, threads "
          f"{torch.get_num_threads()}; estimated {total / 60:.0f} min")  # fmt: skip
    for p, steps, why in plan:
        print(f"  {p['name']}: " + (f"not run ({why})" if why else f"{steps} steps"))
    if args.estimate:
        return
    out = args.out or Path("benchmarks/out/bench_crosscoder_sweep.json")
    results = []
    started = time.perf_counter()
    for p, steps, why in plan:
        if why:
            results.append({**p, "skipped": why})
            continue
        r = measure_point(p, steps, args.repeats, train_saelens, planted, args.min_steps)
        r["estimated"] = steps < default_steps
        results.append(r)
        print(f"  {p['name']}: crossdiff {r['crossdiff_samples_per_s']:,.0f}/s, SAELens "
              f"{r['saelens_samples_per_s']:,.0f}/s, ratio {r['ratio']:.2f}x "
              f"(pairs {', '.join(f'{x:.2f}' for x in r['pair_ratios'])}), "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
        write(out, args, results, default_steps)
    write(out, args, results, default_steps)
    print()
    print(table(results))
    print(
        f"\n'steps' below {default_steps} (est.): the point was estimated from fewer steps "
        f"(--point-seconds {args.point_seconds}). wrote {out}"
    )


def write(out: Path, args: argparse.Namespace, results: list[dict[str, Any]], steps: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "points": args.points,
        "repeats": args.repeats,
        "default_steps": steps,
        "point_seconds": args.point_seconds,
        "phases": list(PHASES),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
