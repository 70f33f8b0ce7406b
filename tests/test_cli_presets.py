"""Every stage subcommand takes `--preset` (the options `crossdiff run` uses for that stage) and
`--out`; run stage by stage at the micro preset they compose, and every crosscoder's cfg.json says
what it read (model and hook names, store and tokenizer fingerprints, SAELens metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import crossdiff.activations.commands as harvest_cmd
import crossdiff.crosscoder.commands as crosscoder_cmd
import crossdiff.data.commands as data_cmd
import crossdiff.models.commands as models_cmd
import crossdiff.report.commands as report_cmd
from crossdiff.cli import _apply_config_file, build_parser, main
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.preset_args import PRESET_NAMES, apply_preset, resolve_out
from crossdiff.run.pipeline import RUN_PRESETS

# subcommand -> (its module, the run stage it is, the arguments it requires)
SUBCOMMANDS = {
    "prepare-data": (data_cmd, "data", ["--out", "d"]),
    "train-models": (models_cmd, "models", ["--out", "r"]),
    "harvest": (harvest_cmd, "store", ["--models", "a", "b", "--out", "s"]),
    "train-crosscoder": (crosscoder_cmd, "crosscoder", ["--store", "s", "--out", "c"]),
    "report": (report_cmd, "report", ["--crosscoder", "c", "--store", "s", "--out", "o"]),
}


def parse(argv: list[str]):
    return build_parser().parse_args(argv)


def resolved(argv: list[str]):
    module, stage, _ = SUBCOMMANDS[argv[0]]
    return apply_preset(parse(argv), stage, module.PRESET_DESTS, getattr(module, "DEFAULTS", {}))


def test_preset_names_are_the_run_presets():
    assert sorted(PRESET_NAMES) == sorted(RUN_PRESETS)


@pytest.mark.parametrize("preset", sorted(RUN_PRESETS))
@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_subcommand_takes_every_option_of_its_stage_in_each_preset(command, preset):
    module, stage, required = SUBCOMMANDS[command]
    args = resolved([command, *required, "--preset", preset])
    for key, value in RUN_PRESETS[preset][stage].items():
        assert getattr(args, module.PRESET_DESTS[key]) == value, (command, key)


def test_flags_and_config_files_override_the_preset_and_no_preset_keeps_the_defaults(tmp_path):
    args = resolved(["train-crosscoder", "--store", "s", "--out", "c", "--preset", "micro"])
    assert (args.expansion, args.k, args.steps, args.batch_size) == (4, 8, 60, 256)
    args = resolved(
        ["train-crosscoder", "--store", "s", "--out", "c", "--preset", "micro", "--k", "4"]
    )
    assert (args.k, args.steps) == (4, 60)
    args = resolved(["train-crosscoder", "--store", "s", "--out", "c"])
    assert (args.expansion, args.k, args.batch_size, args.checkpoint_every) == (8, 32, 1024, 500)
    args = resolved(["harvest", "--models", "a", "b", "--out", "s"])
    assert (args.pairing, args.tokens, args.store_dtype, args.heldout_fraction) == (
        "paper", None, "float16", 0.1,
    )  # fmt: skip
    config = tmp_path / "c.toml"
    config.write_text('[harvest]\ntokens = 5000\nstore_dtype = "float32"\n')
    argv = ["harvest", "--models", "a", "b", "--out", "s", "--preset", "tiny", "--config"]
    parser = build_parser()
    args = _apply_config_file(parser, [*argv, str(config)], parser.parse_args([*argv, str(config)]))
    apply_preset(args, "store", harvest_cmd.PRESET_DESTS, harvest_cmd.DEFAULTS)
    assert (args.tokens, args.store_dtype, args.pairing) == (5000, "float32", "paper")


def test_an_unknown_preset_is_a_one_line_error(tmp_path, capsys):
    assert main(["harvest", "--preset", "huge", "--models", "a", "b", "--out", str(tmp_path)]) == 2
    assert "unknown --preset 'huge'" in capsys.readouterr().err


def test_prepare_data_takes_out_and_still_the_deprecated_positional_folder(capsys):
    args = parse(["prepare-data", "--out", "x"])
    resolve_out(args, "prepare-data")
    assert args.out == Path("x")
    args = parse(["prepare-data", "y"])
    resolve_out(args, "prepare-data")
    assert args.out == Path("y") and "deprecated" in capsys.readouterr().out
    with pytest.raises(CrossdiffError, match="give only --out"):
        resolve_out(parse(["prepare-data", "y", "--out", "x"]), "prepare-data")
    with pytest.raises(CrossdiffError, match="--out DIR"):
        resolve_out(parse(["prepare-data"]), "prepare-data")


def check_provenance(metadata: dict, store_dir: Path, tokenizer_fingerprint: str) -> None:
    from crossdiff.activations import ActivationStore
    from crossdiff.plumbing.fingerprint import store_fingerprint

    store = ActivationStore(store_dir)
    hook = "blocks.2.hook_resid_post"  # the paper pairing's hook, in both models
    assert metadata["model_names"] == ["dense", "moe"]
    assert metadata["hook_points"] == {"dense": [hook], "moe": [hook]}
    assert [m["name"] for m in metadata["models"]] == ["dense", "moe"]
    assert [m["hook_names"] for m in metadata["models"]] == [[hook], [hook]]
    assert [m["weights_hash"] for m in metadata["models"]] == [
        m["weights_hash"] for m in store.manifest["models"]
    ]
    assert metadata["store_fingerprint"] == store_fingerprint(store)
    assert metadata["tokenizer_fingerprint"] == tokenizer_fingerprint
    assert metadata["token_set_fingerprints"] == [store.manifest["segments"][0]["token_set"]]
    # SAELens SAEMetadata fields
    assert metadata["model_name"] == "dense+moe" and metadata["hook_name"] == hook
    assert metadata["dataset_path"] == "crossdiff-store:" + store_fingerprint(store)
    assert metadata["model_class_name"] == "HookedTransformer"
    assert metadata["context_size"] == 128 and metadata["prepend_bos"] is True


@pytest.mark.slow
def test_stage_by_stage_micro_composes_and_crosscoders_record_provenance(tmp_path, monkeypatch):
    """prepare-data into a folder of its own, train-models --data on it, then harvest,
    train-crosscoder and report with --preset micro; the Python API records the same provenance."""
    from crossdiff import CrossCoder, CrossCoderConfig, train_crosscoder
    from crossdiff.activations import ActivationStore
    from crossdiff.data import load_tokenizer, prepare_data

    torch.set_num_threads(1)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data, run = tmp_path / "mydata", tmp_path / "run"
    assert main(["prepare-data", "--preset", "micro", "--out", str(data)]) == 0
    # `crossdiff run --preset micro` passes these options: it would reuse this folder as it is
    prepare_data(data, seed=0, **RUN_PRESETS["micro"]["data"])
    assert main(["train-models", "--preset", "micro", "--data", str(data), "--out", str(run)]) == 0
    assert not (run / "data").exists()  # trained on --data, nothing prepared
    models = [str(run / "models" / name) for name in ("dense", "moe")]
    token_set = str(data / "tokens_train.safetensors")
    store = run / "store"
    argv = ["harvest", "--preset", "micro", "--models", *models, "--token-set", token_set]
    assert main([*argv, "--out", str(store)]) == 0
    assert ActivationStore(store).total_tokens == RUN_PRESETS["micro"]["store"]["n_tokens"]
    cc_dir = run / "crosscoder"
    assert main(["train-crosscoder", "--preset", "micro", "--store", str(store), "--out",
                 str(cc_dir)]) == 0  # fmt: skip
    cfg = json.loads((cc_dir / "cfg.json").read_text())
    assert cfg["d_sae"] == 4 * 128 and cfg["k"] == 8  # the micro preset's expansion and k
    tokenizer_fingerprint = load_tokenizer(data / "tokenizer").fingerprint
    check_provenance(cfg["metadata"], store, tokenizer_fingerprint)

    report = run / "report"
    assert main(["report", "--preset", "micro", "--crosscoder", str(cc_dir), "--store", str(store),
                 "--tokenizer", str(data / "tokenizer"), "--splice-sequences", "0",
                 "--out", str(report)]) == 0  # fmt: skip
    assert json.loads((report / "report.json").read_text())["summary"]["n_tokens"] > 0

    # the Python API on the same store
    cc = train_crosscoder(
        ActivationStore(store), CrossCoderConfig(n_models=2, d_model=128, d_sae=64, k=4),
        steps=20, batch_size=128,
    )  # fmt: skip
    cc.save(tmp_path / "api_cc")
    check_provenance(CrossCoder.load(tmp_path / "api_cc").cfg.metadata.to_dict(), store,
                     tokenizer_fingerprint)  # fmt: skip


def test_raw_activations_and_rotary_positions_reach_their_stage_configs():
    from crossdiff.crosscoder.commands import stage_config
    from crossdiff.models.stage import ModelsStageConfig

    base = ["train-crosscoder", "--store", "s", "--out", "c", "--preset", "tiny"]
    assert stage_config(resolved(base)).normalize is True
    assert stage_config(resolved([*base, "--raw-activations"])).normalize is False
    args = resolved(["train-models", "--out", "r", "--preset", "tiny", "--positions", "rotary"])
    config = ModelsStageConfig.from_args(args, models_cmd.PRESET_DESTS)
    assert config.positions == "rotary"
