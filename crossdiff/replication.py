"""The stages of `crossdiff run` that pair two models and train crosscoders on them, for the main
pair (dense vs MoE), for the extra crosscoder seeds (`--crosscoder-seeds N`) and for the
same-architecture controls (`--controls`): a second dense and a second MoE model trained from
another initialization seed on the same tokens in the same order, each paired with its twin.

A count of "exclusive" latents is only a finding beyond what two models of one architecture and
several crosscoder seeds give anyway; `replication_summary` measures both for the report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from crossdiff.stage_runner import CONTROL_PAIRS, StageRunner, crosscoder_seeds, seed_suffix

# the control models' initialization seed is the run's seed plus this (their batches keep the
# run's seed, so they see exactly the main models' tokens in the same order)
CONTROL_INIT_OFFSET = 1_000
Pair = tuple[tuple[Path, str], tuple[Path, str]]  # ((model folder, name), (model folder, name))


def _is_live(options: dict[str, dict[str, Any]]) -> bool:
    return options["store"].get("activations") == "live"


def live_store_tokens(options: dict[str, dict[str, Any]]) -> int:
    """Tokens of the small store a live run harvests for the report: its held-out part holds the
    documents live training left out (the split depends on the whole token set, not on how many
    tokens are harvested). Twice the report's max_tokens, at most the run's n_tokens."""
    n_tokens = int(options["store"]["n_tokens"])
    return min(n_tokens, 2 * int(options["report"].get("max_tokens", n_tokens)))


def pair_pairing(options: dict[str, dict[str, Any]], pair: Pair) -> Any:
    """The run's pairing, or for a same-architecture pair the pairing's sites of that model on
    both sides (model A's hooks for dense vs dense', model B's for MoE vs MoE')."""
    from crossdiff.activations import load_pairing

    pairing = load_pairing(options["store"]["pairing"])
    (_, name_a), (_, name_b) = pair
    if (name_a, name_b) == ("dense", "moe"):
        return pairing
    side = pairing.hooks_a if name_a == "dense" else pairing.hooks_b
    return dataclasses.replace(
        pairing,
        name=f"{pairing.name} ({name_a} vs {name_b})",
        sites=tuple((hook, hook) for hook in side),
        expert_indices=() if name_a == "dense" else pairing.expert_indices,
        expert_model="auto" if name_a == "dense" else "a",
    )


def store_config(options: dict[str, dict[str, Any]]) -> Any:
    """The store stage's config for the run's options (a live run harvests a small store)."""
    from crossdiff.activations.stage import StoreStageConfig

    store = {k: v for k, v in options["store"].items() if k != "activations"}
    if _is_live(options):
        store["n_tokens"] = live_store_tokens(options)
    return StoreStageConfig.from_options(store)


def harvest_pair(
    runner: StageRunner,
    stage: str,
    pair: Pair,
    options: dict[str, dict[str, Any]],
    data: Any,
    seed: int,
    device: Any,
) -> Any:
    """The store stage `stage` for `pair`: harvest (resuming) unless done; the store."""
    from crossdiff.activations import ActivationStore
    from crossdiff.activations.stage import ModelPair, run_store_stage

    stage_options = {**options["store"], "seed": seed}
    if stage != "store":  # a control store's record names its pair
        stage_options["pair"] = [pair[0][1], pair[1][1]]
    store_dir, done = runner.begin(stage, stage_options)
    if not done:
        (dir_a, name_a), (dir_b, name_b) = pair
        pairing = pair_pairing(options, pair)
        inputs = ModelPair((dir_a, dir_b), (name_a, name_b), data.train, pairing)
        run_store_stage(store_config(options), inputs, store_dir, seed=seed, device=device)
        runner.finish(stage)
    return ActivationStore(store_dir)


def _live_source(pair: Pair, options: dict[str, dict[str, Any]], data: Any, seed: int, device: Any):
    """The live activations of the pair's store harvest: the same store config (tokens, dtype,
    held-out split) and pairing as `harvest_pair`, all `n_tokens` of it."""
    from crossdiff.activations.live import LiveActivations
    from crossdiff.activations.stage import StoreStageConfig
    from crossdiff.models import load_model

    store = {k: v for k, v in options["store"].items() if k != "activations"}
    config = StoreStageConfig.from_options(store)
    (dir_a, name_a), (dir_b, name_b) = pair
    return LiveActivations(
        load_model(dir_a, device=str(device)),
        load_model(dir_b, device=str(device)),
        data.train,
        pair_pairing(options, pair),
        n_tokens=config.n_tokens,
        dtype=config.dtype,
        model_names=(name_a, name_b),
        device=str(device),
        heldout_fraction=config.heldout_fraction,
        split_seed=seed,
    )


def train_pair_crosscoder(
    runner: StageRunner,
    stage: str,
    store: Any,
    pair: Pair,
    options: dict[str, dict[str, Any]],
    data: Any,
    seed: int,
    device: Any,
) -> Any:
    """The crosscoder stage `stage` on `store` with crosscoder seed `seed`: train (resuming from
    its checkpoints) unless done, into the stage folder; the CrossCoder."""
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.crosscoder.stage import CrosscoderStageConfig, run_crosscoder_stage

    cc_dir, done = runner.begin(stage, {**options["crosscoder"], "seed": seed})
    if done:
        return CrossCoder.load(cc_dir)
    source = _live_source(pair, options, data, seed, device) if _is_live(options) else store
    crosscoder = run_crosscoder_stage(
        CrosscoderStageConfig.from_options(options["crosscoder"]),
        source,
        cc_dir,
        seed=seed,
        device=device,
        evaluate_on=store,
    )
    runner.finish(stage)
    return crosscoder


def train_replicates(
    runner: StageRunner,
    store: Any,
    pair: Pair,
    options: dict[str, dict[str, Any]],
    data: Any,
    seed: int,
    device: Any,
    prefix: str = "crosscoder",
) -> None:
    """The crosscoders of the extra seeds (seed + 1, ...), one stage each, on the same store."""
    for i in range(1, crosscoder_seeds(options)):
        stage = f"{prefix}{seed_suffix(i)}"
        train_pair_crosscoder(runner, stage, store, pair, options, data, seed + i, device)


def run_controls(
    runner: StageRunner,
    models_dir: Path,
    options: dict[str, dict[str, Any]],
    data: Any,
    seed: int,
    device: Any,
) -> None:
    """Train the control models, harvest dense vs dense' and MoE vs MoE', and train their
    crosscoders with the main crosscoder's settings and seeds."""
    from crossdiff.models.stage import ModelsStageConfig, run_models_stage

    init_seed = seed + CONTROL_INIT_OFFSET
    control_dir, done = runner.begin(
        "control-models", {**options["models"], "seed": seed, "init_seed": init_seed}
    )
    if not done:
        config = ModelsStageConfig.from_options({**options["models"], "init_seed": init_seed})
        run_models_stage(config, data, control_dir, seed=seed, device=device)
        runner.finish("control-models")
    for name, model in CONTROL_PAIRS:
        pair: Pair = ((models_dir / model, name), (control_dir / model, f"{name}2"))
        store = harvest_pair(runner, f"control-store-{name}", pair, options, data, seed, device)
        prefix = f"control-crosscoder-{name}"
        train_pair_crosscoder(runner, prefix, store, pair, options, data, seed, device)
        train_replicates(runner, store, pair, options, data, seed, device, prefix=prefix)


def _pair_diffs(
    out: Path,
    store_stage: str,
    crosscoder_stage: str,
    options: dict[str, dict[str, Any]],
    data: Any,
    first: Any = None,
) -> list[Any]:
    """One FeatureDiff per crosscoder seed of a pair (held-out tokens; the first may be given)."""
    from crossdiff.activations import ActivationStore
    from crossdiff.analysis import diff_features
    from crossdiff.crosscoder import CrossCoder

    store = ActivationStore(out / store_stage)
    diffs = [] if first is None else [first]
    for i in range(len(diffs), crosscoder_seeds(options)):
        diffs.append(
            diff_features(
                CrossCoder.load(out / f"{crosscoder_stage}{seed_suffix(i)}"),
                store,
                tokenizer=data.tokenizer,
                split=options["report"]["split"],
                max_tokens=options["report"]["max_tokens"],
                n_top_contexts=1,
                panels_per_class=0,
                show_progress=False,
            )
        )
    return diffs


def replication_summary(
    out: Path, main: Any, options: dict[str, dict[str, Any]], data: Any, seed: int
) -> dict[str, Any]:
    """The report's `replicates` block (the main pair over crosscoder seeds) and, with controls,
    its `controls` block (the main pair against dense vs dense' and MoE vs MoE')."""
    from crossdiff.analysis.replicates import replicate_summary

    seeds = [seed + i for i in range(crosscoder_seeds(options))]
    main_diffs = _pair_diffs(out, "store", "crosscoder", options, data, first=main)
    blocks: dict[str, Any] = {"replicates": replicate_summary(main_diffs, seeds)}
    if options.get("controls", {}).get("enabled"):
        from crossdiff.analysis.controls import compare_with_controls

        controls = [
            _pair_diffs(out, f"control-store-{name}", f"control-crosscoder-{name}", options, data)
            for name, _ in CONTROL_PAIRS
        ]
        blocks["controls"] = compare_with_controls(main_diffs, *controls)
        blocks["controls"]["init_seed_offset"] = CONTROL_INIT_OFFSET
    return blocks
