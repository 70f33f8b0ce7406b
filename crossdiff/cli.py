"""`crossdiff` command line: one subcommand per stage of the flow, plus `run` for all of them.

Each stage owns its subcommand in `crossdiff/<stage>/commands.py` (a `register(subparsers)`
function); this module only assembles them and applies an optional TOML config file.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tomllib
import traceback
from pathlib import Path

# (subcommand, module whose `register` adds it, its line in `crossdiff --help`), in the order a
# newcomer meets the stages. Only the module of the command being run is imported, so
# `crossdiff --help` and `--version` start without torch; the others are listed by name and help.
_COMMANDS = (
    (
        "run",
        "crossdiff.run.command",
        "all stages, from the embedded corpus to report.html (resumes)",
    ),
    (
        "prepare-data",
        "crossdiff.data.commands",
        "build the three-domain corpus, tokenizer and packed token sets",
    ),
    (
        "train-models",
        "crossdiff.models.commands",
        "train a dense and an MoE language model on the same tokens",
    ),
    (
        "harvest",
        "crossdiff.activations.commands",
        "record paired activations of two models into an on-disk store",
    ),
    (
        "train-crosscoder",
        "crossdiff.crosscoder.commands",
        "train a BatchTopK crosscoder on an activation store",
    ),
    (
        "report",
        "crossdiff.report.commands",
        "classify latents (shared / model-specific) and write report.html",
    ),
    (
        "inspect",
        "crossdiff.report.inspect",
        "print one latent's class, statistics, examples and logit effects",
    ),
)
_COMMAND_MODULES = tuple(dict.fromkeys(module for _, module, _ in _COMMANDS))
ALL_COMMANDS = "*"

_DESCRIPTION = """\
Diff a dense transformer and a Mixture-of-Experts transformer with a sparse crosscoder.

Stages (each writes a folder the next one reads; each can be run alone):
  prepare-data      build the three-domain corpus, tokenizer and token sets
  train-models      train a dense and an MoE language model on the same tokens
  harvest           record paired activations of two models into an on-disk store
  train-crosscoder  train a BatchTopK crosscoder on a store
  report            classify latents (shared / model-specific) and write report.html
  run               all of the above, resuming whatever already exists
  inspect           print one latent of a report: statistics, examples, logit effects

Every subcommand takes --config FILE.toml: keys of its [section] (e.g. [harvest]) or top-level keys
set the flags' defaults; flags on the command line win.
"""


def build_parser(command: str | None = ALL_COMMANDS) -> argparse.ArgumentParser:
    """The full parser (every stage's options) by default; with `command`, only that command's
    module is imported and the other commands are listed by name (None: no module at all)."""
    parser = argparse.ArgumentParser(
        prog="crossdiff",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from crossdiff import __version__

    parser.add_argument("--version", action="version", version=f"crossdiff {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = {module for name, module, _ in _COMMANDS if command in (ALL_COMMANDS, name)}
    for name, module_name, help_line in _COMMANDS:
        if module_name in wanted:
            wanted.discard(module_name)
            importlib.import_module(module_name).register(subparsers)
        elif name not in subparsers.choices:
            subparsers.add_parser(name, help=help_line)
    for sub in subparsers.choices.values():
        sub.add_argument(
            "--config",
            type=Path,
            default=None,
            help="TOML file whose keys set this command's defaults (flags win)",
        )
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand `argv` names (None for `--help`/`--version` alone; ALL_COMMANDS when its
    first word is not a known command, so argparse reports it against the full parser)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return None
    known = {name for name, _, _ in _COMMANDS}
    return words[0] if words[0] in known else ALL_COMMANDS


def _apply_config_file(
    parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace
) -> argparse.Namespace:
    from crossdiff.plumbing.common import CrossdiffError

    if getattr(args, "config", None) is None:
        return args
    path: Path = args.config
    if not path.exists():
        raise CrossdiffError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise CrossdiffError(f"config file {path} is not valid TOML: {err}") from err
    section = table.get(args.command, {})
    values = {k: v for k, v in table.items() if not isinstance(v, dict)} | section
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    known = {action.dest for action in sub._actions}
    unknown = sorted(k.replace("-", "_") for k in values if k.replace("-", "_") not in known)
    if unknown:
        raise CrossdiffError(
            f"config file {path} sets {unknown}, which `crossdiff {args.command}` does not take; "
            f"see `crossdiff {args.command} --help`"
        )
    sub.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return parser.parse_args(argv)


def _check_environment(args: argparse.Namespace) -> None:
    """Refuse an unknown --device and an unusable output folder before anything is written."""
    from crossdiff.plumbing.common import check_output_dir, check_seed, resolve_device

    if getattr(args, "seed", None) is not None:  # a config file's seed skips argparse's check
        check_seed(args.seed, "--seed")

    device = getattr(args, "device", None)
    if device is not None:
        resolve_device(device)
    for dest, option in (("out", "--out"), ("out_dir", "OUT_DIR")):
        if getattr(args, dest, None) is not None:
            check_output_dir(args.out if dest == "out" else args.out_dir, option)


INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Run one `crossdiff` command; every failure is one line on stderr (exit 2, Ctrl-C 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # stages write atomically and resume, so what was finished is kept
        command = _command_in(argv)
        prog = f"crossdiff {command}" if command not in (None, ALL_COMMANDS) else "crossdiff"
        print(
            f"{prog}: interrupted (Ctrl-C); finished files are kept, run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return INTERRUPTED


def _main(argv: list[str]) -> int:
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from crossdiff.plumbing.common import CrossdiffError, environment_message, is_write_error
    from crossdiff.plumbing.distributed import (
        abort_distributed,
        dist_info,
        finish_distributed,
        init_distributed,
    )

    try:
        args = _apply_config_file(parser, argv, args)
        _check_environment(args)
        init_distributed()  # under torchrun: join the process group; otherwise nothing
        code = int(args.func(args) or 0)
    except CrossdiffError as err:
        print(f"crossdiff {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:
        if dist_info().enabled:
            traceback.print_exc()
            abort_distributed(1)
        if not (isinstance(err, (OSError, MemoryError)) or is_write_error(err)):
            raise  # a bug: its traceback
        print(f"crossdiff {args.command}: error: {environment_message(err)}", file=sys.stderr)
        code = 2
    except BaseException as err:  # Ctrl-C (main() prints its line), SystemExit
        if dist_info().enabled:
            if not isinstance(err, KeyboardInterrupt):
                traceback.print_exc()
                abort_distributed(1)
            print(f"crossdiff {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
            abort_distributed(INTERRUPTED)
        raise
    if code and dist_info().enabled:
        abort_distributed(code)
    finish_distributed()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
