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
    from crossdiff.activations import ActivationStore, harvest

    store_opts = options["store"]
    stage_options = {**store_opts, "seed": seed}
    if stage != "store":  # a control store's record names its pair
        stage_options["pair"] = [pair[0][1], pair[1][1]]
    store_dir, done = runner.begin(stage, stage_options)
    if not done:
        models, tokens, pairing, common = _pair_reading(pair, options, data, seed, device)
        harvest(
            *models,
            tokens,
            pairing,
            store_dir,
            **common,
            n_tokens=live_store_tokens(options) if _is_live(options) else store_opts["n_tokens"],
            resume=True,
            model_dtype=store_opts.get("model_dtype"),  # default: bfloat16 on CUDA
        )
        runner.finish(stage)
    return ActivationStore(store_dir)


def _pair_reading(
    pair: Pair, options: dict[str, dict[str, Any]], data: Any, seed: int, device: Any
) -> tuple[tuple[Any, Any], Any, Any, dict[str, Any]]:
    """What a harvest and a live source of `pair` both read: the two loaded models, the training
    tokens, the pairing, and the keywords that fix the dtype, names, device and held-out split."""
    from crossdiff.models import load_model

    store_opts = options["store"]
    (dir_a, name_a), (dir_b, name_b) = pair
    models = (load_model(dir_a, device=str(device)), load_model(dir_b, device=str(device)))
    common = {
        "dtype": store_opts["dtype"],
        "model_names": (name_a, name_b),
        "device": str(device),
        "heldout_fraction": store_opts.get("heldout_fraction", 0.1),
        "split_seed": seed,
    }
    return models, data.train, pair_pairing(options, pair), common


def _live_source(pair: Pair, options: dict[str, dict[str, Any]], data: Any, seed: int, device: Any):
    """The live activations of the pair's store harvest (same tokens, split and dtype)."""
    from crossdiff.activations.live import LiveActivations

    models, tokens, pairing, common = _pair_reading(pair, options, data, seed, device)
    return LiveActivations(
        *models, tokens, pairing, **common, n_tokens=options["store"]["n_tokens"]
    )


def crosscoder_config(store: Any, cc_opts: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(the CrossCoderConfig for `store`, the remaining options for train_crosscoder)."""
    from crossdiff.crosscoder import CrossCoderConfig
    from crossdiff.crosscoder.config import store_widths
    from crossdiff.validation import CROSSCODER_CONFIG_OPTIONS

    rest = {k: v for k, v in cc_opts.items() if k not in CROSSCODER_CONFIG_OPTIONS}
    config = {k: v for k, v in cc_opts.items() if k in CROSSCODER_CONFIG_OPTIONS}
    expansion = config.pop("expansion")
    cfg = CrossCoderConfig(
        n_models=store.n_models,
        d_model=store.d_model,
        d_models=store_widths(store),
        d_sae=int(expansion * store.d_model),
        dtype=config.pop("dtype", "float32"),
        **config,
    )
    return cfg, rest


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
    its checkpoints) unless done, save it in the stage folder; the CrossCoder."""
    from crossdiff.crosscoder import CrossCoder, train_crosscoder
    from crossdiff.distributed import dist_info

    cc_dir, done = runner.begin(stage, {**options["crosscoder"], "seed": seed})
    if done:
        return CrossCoder.load(cc_dir)
    cfg, training = crosscoder_config(store, options["crosscoder"])
    crosscoder = train_crosscoder(
        _live_source(pair, options, data, seed, device) if _is_live(options) else store,
        cfg,
        seed=seed,
        device=str(device),
        checkpoint_dir=cc_dir / "checkpoints",
        resume=True,
        **training,
    )
    if dist_info().is_main:
        crosscoder.save(cc_dir)
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
    from crossdiff.models import train_language_models

    init_seed = seed + CONTROL_INIT_OFFSET
    control_dir, done = runner.begin(
        "control-models", {**options["models"], "seed": seed, "init_seed": init_seed}
    )
    if not done:
        train_language_models(
            data.train,
            data.heldout,
            control_dir,
            tokenizer=data.tokenizer,
            seed=seed,
            init_seed=init_seed,
            device=str(device),
            **options["models"],
        )
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
