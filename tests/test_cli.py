"""The `crossdiff` command line: every stage is a subcommand, and a TOML file sets defaults."""

import pytest

from crossdiff.cli import _apply_config_file, build_parser, main
from crossdiff.plumbing.common import CrossdiffError


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "prepare-data", "train-models", "harvest", "train-crosscoder", "report"):
        assert command in out


def parse(argv):
    parser = build_parser()
    return _apply_config_file(parser, argv, parser.parse_args(argv))


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('seed = 3\n[run]\nharvest_tokens = 800000\nk = 48\nstop_after = "store"\n')
    args = parse(["run", "--config", str(config), "--k", "16"])
    assert (args.harvest_tokens, args.k, args.seed, args.stop_after) == (800_000, 16, 3, "store")


def test_config_file_with_an_unknown_key_is_refused(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[run]\nharvest_tokenz = 5\n")
    with pytest.raises(CrossdiffError, match="harvest_tokenz"):
        parse(["run", "--config", str(config)])
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
