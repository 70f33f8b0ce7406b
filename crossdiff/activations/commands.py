"""`crossdiff harvest`: record paired activations of two saved models into a store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import CrossdiffError, add_runtime_arguments
from crossdiff.plumbing.preset_args import add_preset_argument, apply_preset

# run-preset "store" option -> this subcommand's dest
PRESET_DESTS = {
    "pairing": "pairing",
    "n_tokens": "tokens",
    "dtype": "store_dtype",
    "heldout_fraction": "heldout_fraction",
    "batch_size": "batch_size",
}
DEFAULTS = {"pairing": "paper", "store_dtype": "float16", "heldout_fraction": 0.1, "batch_size": 32}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "harvest",
        help="record paired activations of two models into an on-disk store",
        description=(
            "Run two models on the same tokens and store their activations at the hook points of "
            "a pairing preset (paper, mlp-all-layers, single-layer, or a TOML file). Re-running "
            "the same command resumes an interrupted harvest. Under `torchrun --nproc_per_node N` "
            "the N processes harvest one store together (docs/store.md)."
        ),
    )
    parser.add_argument(
        "--models", nargs=2, type=Path, required=True, metavar=("DIR_A", "DIR_B"),
        help="two model folders written by crossdiff (config.json + model.safetensors)",
    )  # fmt: skip
    add_preset_argument(parser, None)
    parser.add_argument(
        "--pairing", default=None, help="pairing preset name or TOML path (default: paper)"
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens to harvest (default: the preset's; all)"
    )
    parser.add_argument("--out", type=Path, required=True, help="store folder to write")
    parser.add_argument(
        "--token-set",
        type=Path,
        default=None,
        help="token set file (default: DIR_A/../../data/tokens_train.safetensors)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per forward pass (default 32)"
    )
    parser.add_argument(
        "--store-dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="dtype of activations on disk (default: float16)",
    )
    parser.add_argument(
        "--model-names", nargs=2, default=["dense", "moe"], metavar=("NAME_A", "NAME_B")
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="replace an existing store instead of resuming"
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=None,
        help="fraction of the token set's documents kept out of training for evaluation "
        "(chosen by --seed; 0 = none; default 0.1)",
    )
    add_runtime_arguments(parser)
    parser.set_defaults(func=run_harvest)


def _default_token_set(model_dir: Path) -> Path:
    candidate = model_dir.resolve().parent.parent / "data" / "tokens_train.safetensors"
    if not candidate.exists():
        raise CrossdiffError(
            f"no --token-set given and {candidate} does not exist (models outside a crossdiff run "
            "folder); pass --token-set PATH to a token set saved with TokenSet.save"
        )
    return candidate


def run_harvest(args: argparse.Namespace) -> int:
    from crossdiff.activations.stage import ModelPair, StoreStageConfig, run_store_stage
    from crossdiff.data.tokens import TokenSet
    from crossdiff.plumbing.common import seed_everything
    from crossdiff.plumbing.distributed import dist_info, rank_device

    apply_preset(args, "store", PRESET_DESTS, DEFAULTS)
    seed_everything(args.seed)
    # under torchrun every rank reads the models and the token set (nothing here writes) and
    # harvests its own rows on its own device (`cuda` is cuda:LOCAL_RANK); rank 0 merges and talks
    info = dist_info()
    dir_a, dir_b = args.models
    token_path = args.token_set or _default_token_set(dir_a)
    inputs = ModelPair((dir_a, dir_b), tuple(args.model_names), TokenSet.load(token_path))
    if info.is_main:
        processes = f" by {info.world_size} processes" if info.enabled else ""
        print(
            f"harvesting {dir_a} and {dir_b} on {token_path} with pairing {args.pairing!r}"
            f"{processes}"
        )
    config = StoreStageConfig.from_args(args, PRESET_DESTS)
    run_store_stage(
        config,
        inputs,
        args.out,
        seed=args.seed,
        device=rank_device(args.device),
        dtype=args.dtype,
        resume=not args.no_resume,
    )
    return 0
