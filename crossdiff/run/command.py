"""The `crossdiff run` subcommand: its flags, mapped onto the run's per-stage options
(crossdiff.run.pipeline.run_pipeline does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossdiff.plumbing.common import add_runtime_arguments
from crossdiff.plumbing.presets import RUN_PRESETS
from crossdiff.run.pipeline import ACTIVATIONS, STAGES, run_pipeline
from crossdiff.run.summary import _print_summary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="all stages, from the embedded corpus to report.html (resumes)",
        description=(
            "Build the corpus and tokenizer, train a dense and an MoE model on the same tokens, "
            "harvest their paired activations, train a crosscoder, and write the report. "
            "Each finished stage is skipped on a re-run, so an interrupted run resumes. Under "
            "torchrun --nproc_per_node N -m crossdiff run ..., the models, harvest and "
            "crosscoder run data-parallel over the N processes."
        ),
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(RUN_PRESETS),
        help=(
            "tiny: 2-core CPU in minutes (one model seed); small: a larger pair, three model "
            "seeds; micro: seconds (tests); paper: the seed paper on a GPU, three model seeds"
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run folder")
    parser.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage")
    parser.add_argument("--harvest-tokens", type=int, default=None, help="tokens to harvest")
    parser.add_argument("--lm-steps", type=int, default=None, help="language-model steps")
    parser.add_argument("--crosscoder-steps", type=int, default=None, help="crosscoder steps")
    parser.add_argument("--k", type=int, default=None, help="crosscoder BatchTopK k")
    parser.add_argument("--expansion", type=float, default=None, help="d_sae / d_model")
    parser.add_argument("--pairing", default=None, help="pairing preset name or TOML path")
    parser.add_argument(
        "--architecture",
        choices=("standard", "dfc"),
        default=None,
        help=(
            "crosscoder architecture: standard (default) or dfc, a Dedicated Feature Crosscoder "
            "whose partition gives each model 5%% of the latents as its own (docs/crosscoder.md)"
        ),
    )
    parser.add_argument(
        "--activations",
        choices=ACTIVATIONS,
        default=None,
        help=(
            "store: harvest to disk, then train; live: train from the models' activations "
            "computed on the fly (a small store is harvested for the report). Default: store "
            "if it fits on the disk by an estimate, else live"
        ),
    )
    parser.add_argument(
        "--model-seeds",
        type=int,
        default=None,
        metavar="N",
        help=(
            "train N dense and N MoE models (other init seeds, the same tokens in the same "
            "order) and a crosscoder over all 2N; the report attributes latents to an "
            "architecture per latent and judges the paper's claims over model seeds (N >= 3 "
            "for a verdict; default: the preset's)"
        ),
    )
    parser.add_argument("--controls", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--crosscoder-seeds",
        type=int,
        default=None,
        metavar="N",
        help="train N crosscoders (seeds seed..seed+N-1) per pair; the report gives the spread",
    )
    parser.add_argument(
        "--splice-sequences",
        type=int,
        default=None,
        help="held-out rows for the spliced-in LM loss in the report (default 64; 0: off)",
    )
    add_runtime_arguments(parser)
    for action in parser._actions:
        if action.dest == "dtype":
            action.help = "the crosscoder's parameter dtype (default: float32)"
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.controls:
        from crossdiff.plumbing.common import CrossdiffError

        raise CrossdiffError(
            "--controls was replaced by --model-seeds N: N dense and N MoE models and one "
            "crosscoder over all 2N, whose latents are attributed to an architecture per "
            "latent; --model-seeds 2 is what --controls trained, --model-seeds 3 can give a "
            "verdict (docs/user-guide.md, 'Model seeds')"
        )
    overrides = {
        "models": {"steps": args.lm_steps},
        "store": {"n_tokens": args.harvest_tokens, "pairing": args.pairing},
        "report": {"splice_sequences": args.splice_sequences},
        "replicates": {"crosscoder_seeds": args.crosscoder_seeds},
        "model_seeds": {"n": args.model_seeds},
        "crosscoder": {
            "steps": args.crosscoder_steps,
            "k": args.k,
            "expansion": args.expansion,
            "architecture": args.architecture,
            # the crosscoder's parameter dtype; models and harvest keep their preset's dtypes
            "dtype": None if args.dtype == "float32" else args.dtype,
        },
    }
    summary = run_pipeline(
        args.out,
        args.preset,
        overrides=overrides,
        seed=args.seed,
        device=args.device,
        stop_after=args.stop_after,
        activations=args.activations,
    )
    from crossdiff.plumbing.distributed import dist_info

    if dist_info().is_main:
        _print_summary(summary)
    return 0
