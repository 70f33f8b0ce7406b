"""Train a small dense + MoE pair with crossdiff's trainer: run by the DDP tests under torchrun
(N ranks) and as a plain script (one process) on the same data.

    python train_lm.py DATA_DIR OUT_DIR STEPS [STOP_AFTER]
"""

import os
import sys
from pathlib import Path

import torch

import crossdiff.models.train as train_module
from crossdiff.data import TokenSet
from crossdiff.models import matched_configs, train_language_models
from crossdiff.plumbing.distributed import distributed_job

SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_vocab=48, n_ctx=16, device="cpu")


def _stop_after(n_steps: int) -> None:
    real_step = train_module.train_step
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) > n_steps:
            raise SystemExit(3)
        return real_step(*args, **kwargs)

    train_module.train_step = step


def main() -> None:
    data_dir, out_dir, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    dense_cfg, moe_cfg = matched_configs("tiny", **SMALL, d_mlp=64, num_experts=4)
    if "STOP_AFTER_STEPS" in os.environ:  # simulate a crash: every rank fails at the same step
        _stop_after(int(os.environ["STOP_AFTER_STEPS"]))
    with distributed_job():
        train_language_models(
            TokenSet.load(data_dir / "train.safetensors"),
            TokenSet.load(data_dir / "heldout.safetensors"),
            out_dir,
            dense_cfg=dense_cfg,
            moe_cfg=moe_cfg,
            steps=steps,
            batch_size=8,
            lr=3e-3,
            warmup=2,
            eval_every=steps,
            checkpoint_every=int(os.environ.get("CHECKPOINT_EVERY", steps)),
            eval_rows=4,
            parallel=False,
        )


if __name__ == "__main__":
    main()
