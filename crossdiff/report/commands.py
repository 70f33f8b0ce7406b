"""`crossdiff report`: feature diff of a trained crosscoder on a store, written as a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crossdiff.analysis.classes import SPLITS
from crossdiff.plumbing.common import CrossdiffError, add_runtime_arguments
from crossdiff.plumbing.preset_args import add_preset_argument, apply_preset

# run-preset "report" option -> this subcommand's dest
PRESET_DESTS = {
    "split": "split",
    "max_tokens": "max_tokens",
    "splice_sequences": "splice_sequences",
    "batch_size": "batch_size",
    "verify_candidates": "verify_candidates",
    "verify_sequences": "verify_sequences",
}
DEFAULTS = {"split": "paper", "batch_size": 1024}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="classify latents (shared / model-specific) and write report.html",
        description=(
            "Run a trained crosscoder over an activation store: class of every latent by relative "
            "decoder norm, density per class with the paper's two density tests, domain shares, "
            "routed experts, latent scaling and top contexts. Writes report.json, report.md, a "
            "self-contained report.html, explorer.json (every live latent's examples, histogram "
            "and, with the models, logit effects) and PNG figures to --out."
        ),
    )
    add_preset_argument(parser, None)
    parser.add_argument("--crosscoder", type=Path, required=True, help="saved crosscoder folder")
    parser.add_argument("--store", type=Path, required=True, help="activation store folder")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the report to")
    parser.add_argument(
        "--split",
        default=None,
        choices=sorted(SPLITS),
        help="class thresholds on the relative norm: paper = 0.3/0.7, anchors = 0.1/0.9",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer folder or file for context text (default: STORE/../data/tokenizer)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="analyse at most this many tokens"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="tokens per batch (default 1024)"
    )
    parser.add_argument(
        "--part",
        default=None,
        choices=["heldout", "train", "all"],
        help="which tokens of the store (default: its held-out part; training if it has none)",
    )
    parser.add_argument(
        "--direction",
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="model names: r = |d_B| / (|d_A| + |d_B|) (default: dense moe)",
    )
    parser.add_argument(
        "--min-expert-firings",
        type=int,
        default=20,
        help="no expert attribution for a latent in a MoE layer where it fired fewer times",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="MODELS",
        help="the store's models for the spliced-in LM loss and logit effects: a folder with a "
        "model folder per store model name (MODELS/dense, MODELS/moe; default: "
        "STORE/../models), or NAME=FOLDER per model, each a crossdiff model or a Hugging Face "
        "checkpoint folder (e.g. --models dense=hf/gpt2-tiny moe=hf/mixtral-tiny)",
    )
    parser.add_argument(
        "--heldout",
        type=Path,
        default=None,
        help="held-out token rows for the spliced-in loss (default: "
        "STORE/../data/tokens_heldout.safetensors)",
    )
    parser.add_argument(
        "--splice-sequences",
        type=int,
        default=None,
        help="held-out rows to splice (default 64; 0: no spliced-in loss)",
    )
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="apply the crosscoder to a store other than the one it was trained on (other "
        "models, hooks or tokens), or read contexts with a tokenizer other than the store's; "
        "refused by default, and recorded in the report when allowed",
    )
    parser.add_argument(
        "--verify-candidates",
        type=int,
        default=None,
        help="screen-and-verify: candidates per exclusive class (default 8; 0: none)",
    )
    parser.add_argument(
        "--verify-sequences",
        type=int,
        default=None,
        help="screen-and-verify: held-out rows (default 32)",
    )
    add_runtime_arguments(parser)
    parser.set_defaults(func=run_report)


def _default_tokenizer(store: Path) -> Path | None:
    for candidate in (store.resolve().parent / "data" / "tokenizer",):
        if candidate.exists():
            return candidate
    return None


def run_report(args: argparse.Namespace) -> int:
    from crossdiff.activations import ActivationStore
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.data import load_tokenizer
    from crossdiff.plumbing.common import resolve_device, seed_everything
    from crossdiff.report.stage import ReportInputs, ReportStageConfig, run_report_stage

    apply_preset(args, "report", PRESET_DESTS, DEFAULTS)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    store = ActivationStore(args.store)
    cc = CrossCoder.load(args.crosscoder, device=str(device), dtype=args.dtype)
    tokenizer_path = args.tokenizer or _default_tokenizer(args.store)
    if args.tokenizer is not None and not args.tokenizer.exists():
        raise CrossdiffError(f"--tokenizer {args.tokenizer} does not exist")
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if tokenizer is None:
        print("no tokenizer found: contexts show token ids (pass --tokenizer PATH for text)")
    extra = ("part", "direction", "min_expert_firings")
    config = ReportStageConfig.from_args(args, PRESET_DESTS | {k: k for k in extra})
    models = parse_models(args.models, store.model_names) or args.store.resolve().parent / "models"
    inputs = ReportInputs(
        cc, store, tokenizer, models, _heldout(args, config, models),
        cache_dir=Path(args.out) / "splice-cache", allow_mismatch=args.allow_mismatch,
    )  # fmt: skip
    diff, paths = run_report_stage(config, inputs, args.out, device=device)
    print(format_summary(diff.summary))
    print(f"open the report: {paths['html']}")
    return 0


def parse_models(given: list[str] | None, names: list[str]) -> Path | dict[str, Path] | None:
    """--models: one FOLDER (a model folder per store model name), or NAME=FOLDER per model."""
    if not given:
        return None
    if len(given) == 1 and "=" not in given[0]:
        return Path(given[0])
    pairs = [g.split("=", 1) for g in given]
    bad = [g for g, p in zip(given, pairs, strict=True) if len(p) != 2 or p[0] not in names]
    if bad:
        raise CrossdiffError(
            f"--models {' '.join(given)}: {bad} is not NAME=FOLDER with NAME one of the store's "
            f"models {names}; pass one folder, or NAME=FOLDER for each model"
        )
    return {name: Path(folder) for name, folder in pairs}


def _heldout(args: argparse.Namespace, config: Any, models_dir: Any) -> Any:
    """The held-out rows for the spliced-in LM loss and screen-and-verify, when either is asked
    for and can be computed."""
    from crossdiff.crosscoder.spliced_loss import SPLICE_SEQUENCES
    from crossdiff.data.tokens import TokenSet

    n_rows = SPLICE_SEQUENCES if config.splice_sequences is None else config.splice_sequences
    heldout = args.heldout or args.store.resolve().parent / "data" / "tokens_heldout.safetensors"
    folders = list(models_dir.values()) if isinstance(models_dir, dict) else [models_dir]
    for given in [*(folders if args.models else []), args.heldout]:
        if given is not None and not given.exists():
            raise CrossdiffError(f"{given} does not exist")
    verify = config.verify_candidates is None or config.verify_candidates > 0
    if n_rows <= 0 and not verify:  # neither the spliced loss nor screen-and-verify reads them
        return None
    if not heldout.exists() or not all(f.is_dir() for f in folders):
        print(
            f"no spliced-in LM loss or screen-and-verify: no models in {models_dir} or no "
            f"held-out rows at {heldout} (pass --models and --heldout)"
        )
        return None
    return TokenSet.load(heldout)


def format_summary(summary: dict[str, Any]) -> str:
    from crossdiff.crosscoder.spliced_loss import summary_lines as spliced_loss_lines

    split = summary["split"]
    rec = summary["reconstruction"]
    lines = [
        f"classes ({split['name']} split {split['lo']:g}/{split['hi']:g} on "
        f"{summary['direction']['relative_norm']}):",
        *[f"  {cls:20s} {n}" for cls, n in summary["class_counts"].items()],
        "FVE: "
        + ", ".join(f"{m} {v:.4f}" for m, v in rec["fve_per_model"].items() if v is not None)
        + (
            f"; pooled in normalized units {rec['fve_pooled_normalized']:.4f}"
            if rec.get("fve_pooled_normalized") is not None
            else ""
        )
        + f"; L0 {rec['l0']:.2f}; dead fraction {rec['dead_fraction']:.4f}"
        + f" (on {summary.get('n_tokens')} {summary.get('evaluated_on', 'analysed')} tokens)",
        *_topk_line(rec),
        *[f"- {c['sentence']}" for c in summary["claims"]],
        *[f"warning: {w}" for w in summary["warnings"]],
        *spliced_loss_lines(summary.get("spliced_loss")),
    ]
    return "\n".join(lines)


def _topk_line(rec: dict[str, Any]) -> list[str]:
    if rec.get("fve_topk") is None:
        return []
    per_model = ", ".join(f"{m} {v:.4f}" for m, v in rec["fve_topk_per_model"].items())
    return [f"FVE with BatchTopK at k = {rec['k']:g}: {per_model}; L0 {rec['l0_topk']:.2f}"]
