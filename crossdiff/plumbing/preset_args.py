"""`--preset` on every stage subcommand: one stage's options of a `crossdiff run` preset.

`crossdiff run --preset NAME` runs each stage with `RUN_PRESETS[NAME][stage]`
(crossdiff/run/pipeline.py). A stage subcommand given the same `--preset` takes the same options as
its defaults, so the stages run one by one compose into what `run` does. Precedence, highest
first: the command line, a `--config` file, the preset, the stage's own defaults.
"""

from __future__ import annotations

import argparse
from typing import Any

from crossdiff.plumbing.common import CrossdiffError

# the names of crossdiff.plumbing.presets.RUN_PRESETS (a test keeps them equal); listed here so
# that building the parser reads no preset table
PRESET_NAMES = ("micro", "paper", "small", "tiny")

PRESET_HELP = (
    "options of a `crossdiff run` preset for this stage: tiny (2-core CPU in minutes), small "
    "(a larger pair; about an hour with controls), micro (seconds; tests) or paper (the seed "
    "paper on a GPU); flags given here override them"
)


def add_preset_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    when_absent = f"default: {default}" if default else "default: the stage's own defaults"
    # no argparse `choices`: an unknown name is a CrossdiffError (one line, exit code 2)
    parser.add_argument("--preset", default=default, help=f"{PRESET_HELP} ({when_absent})")


def preset_options(preset: str | None, stage: str) -> dict[str, Any]:
    """The preset's options for `stage` ({} for no preset)."""
    if preset is None:
        return {}
    from crossdiff.plumbing.presets import RUN_PRESETS

    if preset not in RUN_PRESETS:
        raise CrossdiffError(
            f"unknown --preset {preset!r}; the presets are {sorted(RUN_PRESETS)} (the same as "
            "`crossdiff run --preset`)"
        )
    return dict(RUN_PRESETS[preset][stage])


def apply_preset(
    args: argparse.Namespace,
    stage: str,
    dests: dict[str, str],
    defaults: dict[str, Any],
) -> argparse.Namespace:
    """Fill every option the user left unset (None): from the preset's `stage` options (preset
    key -> `dests[key]`), then from the stage's `defaults` (dest -> value)."""
    chosen = preset_options(getattr(args, "preset", None), stage)
    unmapped = sorted(set(chosen) - set(dests))
    if unmapped:
        raise CrossdiffError(
            f"preset {args.preset!r} sets {unmapped} for stage {stage!r}, which this subcommand "
            "does not take; this is a crossdiff bug: add them to its preset mapping"
        )
    for key, value in chosen.items():
        if getattr(args, dests[key], None) is None:
            setattr(args, dests[key], value)
    for dest, value in defaults.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)
    return args


def resolve_out(args: argparse.Namespace, command: str) -> None:
    """`--out DIR`, or the older positional OUT_DIR (deprecated): one of them, into args.out."""
    positional = getattr(args, "out_dir", None)
    if positional is not None and args.out is not None and positional != args.out:
        raise CrossdiffError(
            f"{command}: got both OUT_DIR {positional} and --out {args.out}; give only --out"
        )
    if positional is not None:
        print(f"{command}: the positional OUT_DIR is deprecated; write --out {positional}")
        args.out = positional
    if args.out is None:
        raise CrossdiffError(f"{command}: say where to write with --out DIR")
