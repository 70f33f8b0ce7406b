"""`crossdiff prepare-data`: build the corpus, tokenizer and token sets into a folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crossdiff.data.hf import DomainSource
from crossdiff.plumbing.common import CrossdiffError, add_runtime_arguments
from crossdiff.plumbing.preset_args import add_preset_argument, apply_preset, resolve_out

_SOURCE_KEYS = (
    "domain",
    "path",
    "name",
    "split",
    "column",
    "data_files",
    "data_dir",
    "encoding_errors",
)


def parse_source(spec: str) -> DomainSource:
    """'domain=code,path=bigcode/starcoderdata,column=content[,name=..,split=..,data_dir=..]'"""
    fields = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in _SOURCE_KEYS:
            raise CrossdiffError(
                f"cannot read --hf-source {spec!r}: expected comma-separated key=value pairs "
                f"with keys from {_SOURCE_KEYS}, e.g. domain=stories,path=X,column=story"
            )
        fields[key.strip()] = value.strip()
    if "domain" not in fields or "path" not in fields:
        raise CrossdiffError(f"--hf-source {spec!r} needs at least domain=... and path=...")
    return DomainSource(**fields)


def _proportions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,1,1, got {text!r}") from err


# run-preset "data" option -> this subcommand's dest
PRESET_DESTS = {
    "source": "source",
    "preset": "data_preset",
    "n_chars_per_domain": "n_chars_per_domain",
    "vocab_size": "vocab_size",
    "seq_len": "seq_len",
    "heldout_fraction": "heldout_fraction",
    "tokenizer": "tokenizer",
}


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """prepare_data's keyword options for these arguments (after apply_preset), the same that
    `crossdiff run` passes for the preset, so either one reuses the other's folder."""
    keys = ("source", "n_chars_per_domain", "vocab_size", "seq_len", "heldout_fraction")
    options = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "tokenizer", None) is not None:
        options["tokenizer"] = args.tokenizer
    return {"preset": args.data_preset, **options}


def run(args: argparse.Namespace) -> int:
    from crossdiff.data.stage import DataStageConfig, run_data_stage

    resolve_out(args, "prepare-data")
    apply_preset(args, "data", PRESET_DESTS, {"data_preset": "tiny"})
    hf_sources = [parse_source(s) for s in args.hf_source] if args.hf_source else None
    config = DataStageConfig.from_options(
        {**data_options(args), "hf_sources": hf_sources, "proportions": args.proportions}
    )
    prepared = run_data_stage(config, None, args.out, seed=args.seed)
    print(f"data ready in {prepared.paths['dir']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="build the three-domain corpus, tokenizer and packed token sets",
        description=(
            "Build the corpus (embedded offline default, or Hugging Face datasets), train or load "
            "the tokenizer, and write tokenizer/, tokens_train.safetensors, "
            "tokens_heldout.safetensors and data.json into --out DIR. A folder that already holds "
            "data for the same options is loaded, not rebuilt."
        ),
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder to write (e.g. runs/tiny/data)"
    )
    parser.add_argument(
        "out_dir", type=Path, nargs="?", default=None, help="deprecated: the same as --out DIR"
    )
    add_preset_argument(parser, "tiny")
    parser.add_argument("--source", choices=("embedded", "hf"), default=None)
    parser.add_argument("--n-chars-per-domain", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="train a BPE of this size")
    parser.add_argument("--tokenizer", default=None, help="saved folder or Hugging Face name")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument(
        "--heldout-fraction", type=float, default=None, help="documents held out (default 0.05)"
    )
    parser.add_argument(
        "--hf-source",
        action="append",
        default=None,
        metavar="SPEC",
        help="a Hugging Face source, repeatable: domain=stories,path=ID,column=story[,name=..,"
        "split=..,data_dir=..,data_files=..] (replaces the defaults)",
    )
    parser.add_argument(
        "--proportions", type=_proportions, default=None, help="weights per --hf-source, e.g. 1,1,1"
    )
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)
