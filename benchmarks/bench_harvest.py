"""Harvest speed vs the two bare forward passes, and peak memory of harvesting N vs 4N tokens.

    python benchmarks/bench_harvest.py            # full run
    python benchmarks/bench_harvest.py --quick    # small run

Speed: in one process, on the same token rows, alternating rounds, best round of each:
  (a)  the two bare forward passes, no hooks read (return_type=None: no unembedding);
  (a') the same, stopped after the paper pairing's deepest block (what harvest itself runs);
  (b)  harvest(...) with the `paper` pairing, written to disk as float16 shards.
Tokens/s count input tokens (rows x seq_len) for all three. Memory: peak resident set size of a
fresh subprocess harvesting N and 4N tokens. Writes benchmarks/out/bench_harvest.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from crossdiff.activations import harvest, load_pairing
from crossdiff.activations.pairing import hook_layer

warnings.filterwarnings("ignore", category=DeprecationWarning)
OUT = Path(__file__).parent / "out" / "bench_harvest.json"


def build_pair():
    try:
        from crossdiff.models import build_model, dense_config, moe_config

        torch.manual_seed(0)
        dense, moe = build_model(dense_config("tiny")), build_model(moe_config("tiny"))
        return dense.eval(), moe.eval(), "crossdiff tiny"
    except ImportError:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        common = dict(n_layers=5, d_model=128, n_heads=4, d_head=32, n_ctx=256, d_vocab=4096)
        dense = HookedTransformerConfig(**common, d_mlp=512, act_fn="silu", gated_mlp=True)
        moe = HookedTransformerConfig(
            **common, d_mlp=256, act_fn="silu", gated_mlp=True, num_experts=8, experts_per_token=2
        )
        return (
            HookedTransformer(dense).eval(),
            HookedTransformer(moe).eval(),
            "stock TransformerLens",
        )


def make_tokens(n_tokens: int, seq_len: int, d_vocab: int) -> torch.Tensor:
    n_seq = -(-n_tokens // (seq_len - 1))
    tokens = torch.randint(1, d_vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    return tokens


def bare(models, tokens: torch.Tensor, batch_size: int, stop_at_layer: int | None) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for row in range(0, len(tokens), batch_size):
            for model in models:
                model(tokens[row : row + batch_size], return_type=None, stop_at_layer=stop_at_layer)
    return time.perf_counter() - start


def harvested(models, tokens, batch_size: int, shard_tokens: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        harvest(
            *models,
            tokens,
            "paper",
            Path(tmp) / "store",
            batch_size=batch_size,
            shard_tokens=shard_tokens,
            progress=False,
        )
        return time.perf_counter() - start


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: reset the process's peak RSS (VmHWM), so the peak below is the harvest's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(n_tokens: int, seq_len: int, batch_size: int, shard_tokens: int | None) -> None:
    models = build_pair()[:2]
    tokens = make_tokens(n_tokens, seq_len, models[0].cfg.d_vocab)
    before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        store = harvest(
            *models,
            tokens,
            "paper",
            Path(tmp) / "s",
            batch_size=batch_size,
            shard_tokens=shard_tokens,
            progress=False,
        )
        n_shards = store.n_shards
    if reset and _proc_status_kib("VmHWM") is not None:
        peak, how = _proc_status_kib("VmHWM"), "VmHWM since just before harvest"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss of the process"
    report = {"peak_kib": peak, "rss_before_kib": before, "n_shards": n_shards, "how": how}
    print(json.dumps(report))


def measure_memory(n_tokens: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--memory-child", str(n_tokens)]
    command += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.shard_tokens:
        command += ["--shard-tokens", str(args.shard_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace, n_tokens: int, rounds: int) -> dict:
    *models, source = build_pair()
    tokens = make_tokens(n_tokens, args.seq_len, models[0].cfg.d_vocab)
    pairing = load_pairing("paper")
    stop = max(hook_layer(h) for h in pairing.hooks_a + pairing.expert_indices) + 1
    n_input = tokens.numel()
    print(f"{source} models, {len(tokens)} rows x {args.seq_len} tokens, {rounds} rounds")
    bare(models, tokens[: args.batch_size], args.batch_size, None)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "bare_same_depth": [], "harvest": []}
    for _ in range(rounds):
        times["bare"].append(bare(models, tokens, args.batch_size, None))
        times["bare_same_depth"].append(bare(models, tokens, args.batch_size, stop))
        times["harvest"].append(harvested(models, tokens, args.batch_size, args.shard_tokens))
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n_input / v for k, v in best.items()}
    print(f"(a)  bare forward passes, full depth:   {rate['bare']:10.0f} tokens/s")
    print(f"(a') bare forward passes, to block {stop}:  {rate['bare_same_depth']:10.0f} tokens/s")
    print(f"(b)  harvest to disk (paper pairing):   {rate['harvest']:10.0f} tokens/s")
    ratio = rate["harvest"] / rate["bare"]
    ratio_same_depth = rate["harvest"] / rate["bare_same_depth"]
    print(f"ratio (b)/(a)  = {ratio:.2f}  (target >= 0.8)")
    print(f"ratio (b)/(a') = {ratio_same_depth:.2f}  (cost of hooks, copies and disk writes)")
    return {
        "models": source,
        "rows": len(tokens),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "input_tokens": n_input,
        "seconds": times,
        "tokens_per_s": rate,
        "ratio_harvest_vs_bare": ratio,
        "ratio_harvest_vs_bare_same_depth": ratio_same_depth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run")
    parser.add_argument("--tokens", type=int, default=None, help="tokens for the speed test")
    parser.add_argument("--memory-tokens", type=int, default=None, help="N of the memory test")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--memory-only", action="store_true", help="skip the speed test")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.seq_len, args.batch_size, args.shard_tokens)
        return
    n_tokens = args.tokens or (16_384 if args.quick else 131_072)
    n_memory = args.memory_tokens or (32_768 if args.quick else 131_072)
    if args.quick and args.shard_tokens is None:
        args.shard_tokens = 8192  # several shards even in the small run
    rounds = args.rounds or 3

    result: dict = {}
    if not args.memory_only:
        result = speed(args, n_tokens, rounds)
    small, large = measure_memory(n_memory, args), measure_memory(4 * n_memory, args)
    growth = large["peak_kib"] / small["peak_kib"] - 1
    print(
        f"peak RSS harvesting {n_memory} tokens: {small['peak_kib'] / 1024:.0f} MiB "
        f"({small['n_shards']} shards); {4 * n_memory} tokens: {large['peak_kib'] / 1024:.0f} MiB "
        f"({large['n_shards']} shards); growth {growth:+.1%} (target < 10%); "
        f"RSS before harvest {small['rss_before_kib'] / 1024:.0f} / "
        f"{large['rss_before_kib'] / 1024:.0f} MiB; peak = {small['how']}"
    )
    result |= {
        "memory": {"n_tokens": n_memory, "n": small, "4n": large, "growth": growth},
        "torch_threads": torch.get_num_threads(),
        "note": "measured on a shared machine; compare ratios, not absolute rates",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
