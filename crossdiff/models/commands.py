"""`crossdiff train-models`: prepare the data (or reuse it) and train the dense and MoE models."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import CrossdiffError, add_runtime_arguments
from crossdiff.plumbing.preset_args import (
    PRESET_NAMES,
    add_preset_argument,
    apply_preset,
    preset_options,
)

# run-preset "models" option -> this subcommand's dest
PRESET_DESTS = {
    "preset": "model_preset",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "warmup": "warmup",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "eval_rows": "eval_rows",
    "positions": "positions",
}


def _load_data(args: argparse.Namespace) -> Any:
    """--data DIR: any prepared folder as it is; otherwise OUT/data with the preset's options
    (prepared now if absent; `prepare-data --preset P --out OUT/data` makes the same folder)."""
    from crossdiff.data.prepare import load_prepared_data
    from crossdiff.data.stage import DataStageConfig, run_data_stage
    from crossdiff.plumbing.distributed import main_process_first

    if args.data is not None:
        if args.corpus is not None:
            raise CrossdiffError(
                f"train-models: --corpus {args.corpus} chooses how OUT/data is prepared, but "
                f"--data {args.data} is already prepared; give one of them"
            )
        return load_prepared_data(args.data)
    options = preset_options(args.preset, "data") or {"preset": "tiny"}
    if args.corpus is not None:
        options["source"] = args.corpus
    with main_process_first():  # under torchrun rank 0 prepares; the others then reuse it
        return run_data_stage(DataStageConfig.from_options(options), None, args.out / "data",
                              seed=args.seed)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from crossdiff.models.configs import get_preset
    from crossdiff.models.stage import ModelsStageConfig, run_models_stage
    from crossdiff.plumbing.distributed import dist_info

    if args.preset not in PRESET_NAMES:
        get_preset(args.preset)  # the error names the model presets (each is a run preset too)
    apply_preset(args, "models", PRESET_DESTS, {"model_preset": "tiny", "eval_rows": 64})
    get_preset(args.model_preset)  # fail on a bad name before any data work
    started = time.perf_counter()
    data = _load_data(args)
    extra = ("threads", "parallel", "autocast")
    config = ModelsStageConfig.from_args(args, PRESET_DESTS | {k: k for k in extra})
    result = run_models_stage(
        config, data, args.out / "models", seed=args.seed, device=args.device, dtype=args.dtype
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
            "Prepare the three-domain data in OUT/data with the preset's options (or reuse it; "
            "--data DIR takes any prepared folder instead), then train the dense and "
            "the MoE model of a preset on the identical token stream into OUT/models (dense/, "
            "moe/, tokenizer/, eval.json). A rerun resumes from checkpoints and skips finished "
            "models. Data-parallel on N processes: torchrun --nproc_per_node N -m crossdiff "
            "train-models ..."
        ),
    )
    add_preset_argument(parser, "tiny")
    parser.add_argument(
        "--out", type=Path, required=True, help="run folder: writes OUT/models (e.g. runs/tiny)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a folder written by `crossdiff prepare-data` to train on (default: OUT/data, "
        "prepared with the preset's options if absent)",
    )
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
    parser.add_argument(
        "--positions",
        choices=("learned", "rotary"),
        default=None,
        help="positional embeddings: learned (the presets') or rotary (the seed paper's code)",
    )
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument(
        "--eval-rows",
        type=int,
        default=None,
        help="held-out rows per domain in the final evaluation (default 64)",
    )
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
