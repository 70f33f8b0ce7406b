"""How long the report's spliced-in loss takes at the tiny preset's model shape (d_model 128,
5 layers, vocab 4,096, 256-token rows, the paper pairing), first run and a rerun with another
crosscoder (which reads the cached clean and ablated losses when the code has the cache).

    .venv/bin/python benchmarks/splice_speed.py              # 16 rows, 1 torch thread
    .venv/bin/python benchmarks/splice_speed.py --rows 64    # what `crossdiff run` splices

The models are untrained (build_model of the tiny preset, seed 0) and the crosscoders random:
the work does not depend on the weights. Run it against another checkout of crossdiff (its
PYTHONPATH) for a before/after on the same machine. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time

import torch

import crossdiff
from crossdiff.crosscoder.spliced_loss import spliced_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = crossdiff.build_model(crossdiff.dense_config("tiny")).eval()
    moe = crossdiff.build_model(crossdiff.moe_config("tiny")).eval()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 4096, (args.rows, 256), generator=g)
    rows[:, 0] = 0
    cfg = crossdiff.CrossCoderConfig(n_models=2, d_model=128, d_sae=1024, k=32)
    crosscoders = [crossdiff.CrossCoder(cfg), crossdiff.CrossCoder(cfg)]
    cached = "cache_dir" in inspect.signature(spliced_loss).parameters
    times, ce = [], []
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"cache_dir": tmp} if cached else {}
        for cc in crosscoders:
            t0 = time.perf_counter()
            out = spliced_loss(cc, (dense, moe), rows, "paper", **extra)
            times.append(round(time.perf_counter() - t0, 2))
            ce.append({n: round(r["ce_spliced"], 6) for n, r in out["models"].items()})
    print(json.dumps({"crossdiff": crossdiff.__file__, "rows": args.rows, "threads": args.threads,
                      "cache": cached, "first_s": times[0], "rerun_other_crosscoder_s": times[1],
                      "ce_clean": {n: round(r["ce_clean"], 6) for n, r in out["models"].items()},
                      "ce_spliced": ce}))  # fmt: skip


if __name__ == "__main__":
    main()
