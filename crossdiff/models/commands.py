"""`crossdiff train-models`: prepare the data (or reuse it) and train the dense and MoE models."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from crossdiff.common import add_runtime_arguments, resolve_dtype


def run(args: argparse.Namespace) -> int:
    from crossdiff.data import prepare_data
    from crossdiff.distributed import dist_info, main_process_first
    from crossdiff.models.configs import get_preset, matched_configs
    from crossdiff.models.train import train_language_models

    get_preset(args.preset)  # fail on a bad name before any data work
    started = time.perf_counter()
    with main_process_first():  # under torchrun rank 0 prepares; the others then reuse it
        data = prepare_data(
            args.out / "data", source=args.corpus, preset=args.preset, seed=args.seed
        )
    dense_cfg, moe_cfg = matched_configs(
        args.preset, d_vocab=int(data.tokenizer.vocab_size), dtype=resolve_dtype(args.dtype)
    )
    result = train_language_models(
        data.train,
        data.heldout,
        args.out / "models",
        preset=args.preset,
        dense_cfg=dense_cfg,
        moe_cfg=moe_cfg,
        tokenizer=data.tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
        parallel=args.parallel,
        autocast=args.autocast,
    )
    seconds = time.perf_counter() - started
    if not dist_info().is_main:
        return 0
    met = all(m["meets_target"] for m in result.eval["models"].values())
    print(
        f"train-models finished in {seconds:.0f} s; models in {args.out / 'models'}; "
        f"held-out target {'met' if met else 'NOT met'} (see {result.paths['eval']})"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-models",
        help="train a dense and an MoE language model on the same tokens",
        description=(
            "Prepare the three-domain data in OUT/data (or reuse it), then train the dense and "
            "the MoE model of a preset on the identical token stream into OUT/models (dense/, "
            "moe/, tokenizer/, eval.json). A rerun resumes from checkpoints and skips finished "
            "models. Data-parallel on N processes: torchrun --nproc_per_node N -m crossdiff "
            "train-models ..."
        ),
    )
    parser.add_argument("--preset", default="tiny", help="model preset: tiny or paper")
    parser.add_argument("--out", type=Path, required=True, help="run folder (e.g. runs/tiny)")
    parser.add_argument(
        "--corpus",
        choices=("embedded", "hf"),
        default=None,
        help="embedded (offline, default for tiny) or hf (Hugging Face streaming)",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads per model (default: automatic)"
    )
    parser.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train both models at once in two processes (default: on for CPU)",
    )
    parser.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast of the forward pass (default: on for CUDA, off for CPU)",
    )
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)
