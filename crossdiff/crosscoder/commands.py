"""`crossdiff train-crosscoder`: train a crosscoder on an activation store and evaluate it."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from crossdiff.crosscoder.config import (
    AUX_LOSSES,
    B_DEC_INITS,
    CODE_NORMALIZATIONS,
    RECON_LOSSES,
    SHARED_PENALTIES,
    THRESHOLD_SCHEDULES,
)
from crossdiff.crosscoder.stage import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_EXPANSION,
    DEFAULT_K,
    DEFAULT_STEPS,
    CrosscoderStageConfig,
    run_crosscoder_stage,
)
from crossdiff.plumbing.common import CrossdiffError, add_runtime_arguments
from crossdiff.plumbing.distributed import dist_info
from crossdiff.plumbing.lock import folder_lock
from crossdiff.plumbing.preset_args import add_preset_argument, apply_preset

# run-preset "crosscoder" option -> this subcommand's dest
PRESET_DESTS = {
    key: key
    for key in (
        "expansion", "k", "n_shared", "shared_decoder", "shared_penalty_ratio", "steps",
        "batch_size", "lr", "k_anneal_steps", "k_anneal_start", "aux_loss_coefficient",
        "checkpoint_every", "eval_tokens", "lr_warmup_steps", "lr_decay_fraction",
        "dead_after_tokens", "architecture", "normalize",
    )
}  # fmt: skip
# the seed paper fork's options (docs/crosscoder.md), passed to train_crosscoder when given:
# option -> (type, choices or None, help)
FORK_OPTIONS: dict[str, tuple[type, tuple[str, ...] | None, str]] = {
    "code_normalization": (
        str, CODE_NORMALIZATIONS, "decoder norms weighting selection: sum (default), concat, mixed"
    ),
    "code_normalization_alpha": (float, None, "weight of concat in mixed (default 0.7)"),
    "shared_penalty": (
        str, SHARED_PENALTIES,
        "selection: divide shared latents' scores by the ratio (default); sparsity: the fork's "
        "additive decoder-norm penalties",
    ),
    "shared_sparsity_coefficient": (float, None, "sparsity: lambda_s (default 0.15 * aux)"),
    "sparsity_coefficient": (float, None, "sparsity: lambda_f (default the aux coefficient)"),
    "threshold_schedule": (str, THRESHOLD_SCHEDULES, "rate (default) or ema (the fork's)"),
    "threshold_beta": (float, None, "ema: beta (default 0.999)"),
    "threshold_start_step": (int, None, "ema: first update after this step (default 1000)"),
    "aux_loss": (str, AUX_LOSSES, "saelens (default) or fork (normalized aux-k)"),
    "recon_loss": (str, RECON_LOSSES, "mse (default) or l2 (the fork's)"),
    "b_dec_init": (str, B_DEC_INITS, "mean (default) or geometric_median"),
}  # fmt: skip
PRESET_DESTS |= {key: key for key in FORK_OPTIONS}
# the stage config's defaults of the options a preset may leave unset (shown in --help)
_DEFAULTED = ("expansion", "k", "n_shared", "shared_decoder", "shared_penalty_ratio", "steps",
              "batch_size", "k_anneal_steps", "checkpoint_every", "eval_tokens")  # fmt: skip
DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(CrosscoderStageConfig) if f.name in _DEFAULTED
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-crosscoder",
        help="train a BatchTopK crosscoder on an activation store",
        description=(
            "Train a BatchTopK crosscoder (SAELens extension) on a store written by "
            "`crossdiff harvest`. Writes OUT/cfg.json + OUT/sae_weights.safetensors (load with "
            "crossdiff.CrossCoder.load(OUT) or sae_lens.SAE.load_from_disk(OUT) after "
            "`import crossdiff`), OUT/training.json, and checkpoints in OUT/checkpoint/ "
            "(an interrupted run resumes from them). Data-parallel on N processes: torchrun "
            "--nproc_per_node N -m crossdiff train-crosscoder ... (--batch-size is global)."
        ),
    )
    add_preset_argument(p, None)
    p.add_argument("--store", type=Path, required=True, help="activation store folder")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--d-sae", type=int, default=None, help="number of latents")
    width.add_argument(
        "--expansion",
        type=float,
        default=None,
        help=f"d_sae = expansion * d_model (default {DEFAULT_EXPANSION})",
    )
    p.add_argument(
        "--k",
        type=float,
        default=None,
        help=f"mean active latents per token (default {DEFAULT_K})",
    )
    p.add_argument(
        "--n-shared", type=int, default=None, help="designated shared latents (default 0)"
    )
    p.add_argument(
        "--shared-decoder",
        choices=("free", "tied"),
        default=None,
        help="free: a decoder vector per model; tied: one for all models (default free)",
    )
    p.add_argument(
        "--shared-penalty-ratio",
        type=float,
        default=None,
        help="selection cost of shared latents relative to the others (default 0.7)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"tokens per step (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default 2e-4 / sqrt(d_sae / 2**14))"
    )
    p.add_argument(
        "--k-anneal-steps", type=int, default=None, help="anneal k over these first steps"
    )
    p.add_argument("--k-anneal-start", type=float, default=None, help="k at step 0 when annealing")
    p.add_argument(
        "--aux-loss-coefficient", type=float, default=None, help="dead-latent loss weight (1/32)"
    )
    p.add_argument(
        "--lr-warmup-steps", type=int, default=None, help="lr warm-up steps (default 5%% of steps)"
    )
    p.add_argument(
        "--lr-decay-fraction",
        type=float,
        default=None,
        help="last fraction of steps with the lr decaying to 0 (default 0.2)",
    )
    p.add_argument(
        "--dead-after-tokens",
        type=int,
        default=None,
        help="tokens without firing that make a latent dead (default min(10M, tokens / 10))",
    )
    p.add_argument(
        "--architecture",
        choices=("standard", "dfc"),
        default=None,
        help="standard (default) or dfc: a Dedicated Feature Crosscoder (5%% exclusive per model)",
    )
    p.add_argument(
        "--raw-activations",
        dest="normalize",
        action="store_false",
        default=None,
        help="train on the store's raw activations, as the seed paper's fork does (default: each "
        "model scaled to mean norm sqrt(d_model); raw leans relative norms toward the model with "
        "the larger residual stream)",
    )
    for name, (kind, choices, text) in FORK_OPTIONS.items():
        p.add_argument(
            "--" + name.replace("_", "-"), type=kind, choices=choices, default=None, help=text
        )
    p.add_argument(
        "--checkpoint-every", type=int, default=None, help="steps between checkpoints (500)"
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help=f"tokens for the final evaluation (default {DEFAULT_EVAL_TOKENS})",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove OUT's crosscoder and checkpoint, then train",
    )
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (SAELens logger)")
    p.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast of the encoder matmul (default: on for CUDA; loss stays float32)",
    )
    p.add_argument("--wandb-project", default="crossdiff")
    p.add_argument(
        "--eval-part",
        default=None,
        choices=["heldout", "train", "all"],
        help="store part the final metrics read (default: held-out; training if it has none)",
    )
    add_runtime_arguments(p)
    p.set_defaults(func=run)


def _open_store(path: Path) -> Any:
    from crossdiff.activations import ActivationStore

    if not (path / "manifest.json").exists():
        raise CrossdiffError(
            f"{path} is not an activation store (no manifest.json); run `crossdiff harvest`"
        )
    return ActivationStore(path)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible options before anything is read or trained; name all of them."""

    def positive(value: Any) -> bool:
        return isinstance(value, int | float) and value > 0 and math.isfinite(value)

    problems = []
    if args.d_sae is not None and args.d_sae < 1:
        problems.append(f"--d-sae {args.d_sae}: the number of latents must be at least 1")
    if args.d_sae is None and not positive(args.expansion):
        problems.append(f"--expansion {args.expansion}: must be a positive number")
    if not positive(args.k):
        problems.append(f"--k {args.k}: the mean number of active latents must be positive")
    if not positive(args.shared_penalty_ratio):
        problems.append(f"--shared-penalty-ratio {args.shared_penalty_ratio}: must be positive")
    for flag, value, minimum in (
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--eval-tokens", args.eval_tokens, 1),
        ("--n-shared", args.n_shared, 0),
        ("--checkpoint-every", args.checkpoint_every, 0),
        ("--k-anneal-steps", args.k_anneal_steps, 0),
    ):
        if value < minimum:
            problems.append(f"{flag} {value}: must be at least {minimum}")
    if args.lr is not None and not positive(args.lr):
        problems.append(f"--lr {args.lr}: must be a positive number")
    for flag, value in (
        ("--lr-warmup-steps", args.lr_warmup_steps),
        ("--dead-after-tokens", args.dead_after_tokens),
        ("--threshold-start-step", args.threshold_start_step),
    ):
        if value is not None and value < 0:
            problems.append(f"{flag} {value}: must be at least 0")
    if args.aux_loss_coefficient is not None and not args.aux_loss_coefficient >= 0:
        problems.append(f"--aux-loss-coefficient {args.aux_loss_coefficient}: must be >= 0")
    if problems:
        raise CrossdiffError("train-crosscoder: " + "; ".join(problems))


def stage_config(args: argparse.Namespace) -> CrosscoderStageConfig:
    """The stage config for these arguments (after apply_preset): the preset's options, the
    flags and the runtime ones this subcommand adds (--d-sae, --dtype, --wandb, ...)."""
    extra = ("d_sae", "dtype", "eval_part", "wandb", "wandb_project", "autocast")
    return CrosscoderStageConfig.from_args(args, PRESET_DESTS | {k: k for k in extra})


def run(args: argparse.Namespace) -> int:
    apply_preset(args, "crosscoder", PRESET_DESTS, DEFAULTS)
    check_arguments(args)
    out: Path = args.out
    with folder_lock(out / ".train.lock", f"crosscoder folder {out}", enabled=dist_info().is_main):
        run_crosscoder_stage(
            stage_config(args),
            _open_store(args.store),
            out,
            seed=args.seed,
            device=args.device,
            resume=not args.no_resume,
            overwrite=args.overwrite,
            checkpoints="checkpoint",  # this subcommand's folder name before the stage contract
        )
    return 0
