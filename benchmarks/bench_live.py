"""Crosscoder training from live activations vs from a store, the store's harvest included.

    python benchmarks/bench_live.py            # 65,536 tokens, 64 steps of 1,024
    python benchmarks/bench_live.py --quick    # 16,384 tokens, 16 steps

In one process, on the same token rows, the crossdiff `tiny` dense and MoE models, the `paper`
pairing, float16 activations, a crosscoder of 4 x 128 latents (k 32):
  (a) store path: harvest(...) to a temporary folder, then train_crosscoder(store)
  (b) live path:  train_crosscoder(LiveActivations(...)), the models run while it trains
Throughput = crosscoder training tokens (steps x batch) / wall seconds of the whole path. Both
paths run twice, alternating, and the faster run of each counts. Also checks the two crosscoders
agree (largest weight difference). Writes benchmarks/out/bench_live.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from crossdiff.activations import harvest
from crossdiff.activations.live import LiveActivations
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
from crossdiff.models import build_model, dense_config, moe_config

warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("TQDM_DISABLE", "1")
OUT = Path(__file__).parent / "out" / "bench_live.json"
SEQ_LEN = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    n_tokens, steps = (16_384, 16) if args.quick else (65_536, 64)
    torch.manual_seed(0)
    dense, moe = build_model(dense_config("tiny")).eval(), build_model(moe_config("tiny")).eval()
    n_seq = -(-n_tokens // (SEQ_LEN - 1)) + 1
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, dense.cfg.d_vocab, (n_seq, SEQ_LEN), generator=g)
    tokens[:, 0] = 0
    width = dense.cfg.d_model
    cfg = CrossCoderConfig(n_models=2, d_model=width, d_sae=4 * width, k=32)
    common = dict(n_tokens=n_tokens, dtype="float16", batch_size=32)
    training = dict(steps=steps, batch_size=1024, seed=0, log_every=10**9)

    def store_path() -> tuple[float, object]:
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            store = harvest(dense, moe, tokens, "paper", folder, progress=False, **common)
            cc = train_crosscoder(store, cfg, **training)
            return time.perf_counter() - t0, cc

    def live_path() -> tuple[float, object]:
        t0 = time.perf_counter()
        live = LiveActivations(dense, moe, tokens, "paper", **common)
        cc = train_crosscoder(live, cfg, **training)
        return time.perf_counter() - t0, cc

    runs: dict[str, list[float]] = {"store": [], "live": []}
    models = {}
    for _ in range(args.rounds):
        for name, path in (("store", store_path), ("live", live_path)):
            seconds, models[name] = path()
            runs[name].append(seconds)
            print(f"{name}: {seconds:.2f} s")
    trained = steps * training["batch_size"]
    a, b = models["store"].state_dict(), models["live"].state_dict()  # type: ignore[attr-defined]
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
    result = {
        "n_tokens": n_tokens,
        "trained_tokens": trained,
        "seconds": runs,
        "store_tokens_per_s": trained / min(runs["store"]),
        "live_tokens_per_s": trained / min(runs["live"]),
        "ratio_live_over_store": min(runs["store"]) / min(runs["live"]),
        "max_weight_difference": worst,
        "torch_threads": torch.get_num_threads(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
