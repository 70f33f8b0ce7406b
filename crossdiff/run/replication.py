"""The stages of `crossdiff run` that pair models and train crosscoders on them: the main pair
(dense vs MoE), the extra crosscoder seeds (`--crosscoder-seeds C`) and the model seeds
(`--model-seeds N`): N - 1 more dense and MoE models trained from other initialization seeds on
the same tokens in the same order, each pair harvested on the same tokens, and one crosscoder
over all 2N models' activations per crosscoder seed (crossdiff.analysis.architectures attributes
its latents to an architecture per latent).

A statement about the architectures is a finding only beyond what model seeds and crosscoder
seeds give anyway; `replication_summary` measures both for the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crossdiff.activations.store import ActivationStore
from crossdiff.run.stage_graph import StageRunner, crosscoder_seeds, model_seeds, seed_suffix

# model seed i's initialization seed is the run's seed plus i times this (its batches keep the
# run's seed, so every model sees exactly the main models' tokens in the same order)
MODEL_SEED_OFFSET = 1_000
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
    """The run's pairing (every pair of a run is a dense model and an MoE)."""
    from crossdiff.activations import load_pairing

    return load_pairing(options["store"]["pairing"])


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


def seed_pair(out: Path, index: int) -> Pair:
    """The dense and MoE models of model seed `index` (0: the main pair)."""
    models = out / ("models" if index == 0 else f"models-seed{index}")
    suffix = "" if index == 0 else str(index + 1)
    return ((models / "dense", f"dense{suffix}"), (models / "moe", f"moe{suffix}"))


def run_model_seeds(
    runner: StageRunner,
    options: dict[str, dict[str, Any]],
    data: Any,
    seed: int,
    device: Any,
) -> None:
    """Train the extra model seeds' dense and MoE models, harvest each pair, and train the joint
    crosscoders over all 2N models (one per crosscoder seed)."""
    from crossdiff.models.stage import ModelsStageConfig, run_models_stage

    stores = [ActivationStore(runner.out / "store")]
    for i in range(1, model_seeds(options)):
        init_seed = seed + i * MODEL_SEED_OFFSET
        stage = f"models-seed{i}"
        models_dir, done = runner.begin(
            stage, {**options["models"], "seed": seed, "init_seed": init_seed}
        )
        if not done:
            config = ModelsStageConfig.from_options({**options["models"], "init_seed": init_seed})
            run_models_stage(config, data, models_dir, seed=seed, device=device)
            runner.finish(stage)
        pair = seed_pair(runner.out, i)
        stores.append(harvest_pair(runner, f"store-seed{i}", pair, options, data, seed, device))
    joint = joint_store(stores)
    if _is_live(options) and runner.is_main:
        print(
            f"[crossdiff] joint crosscoders: a live run's stores hold {joint.n_tokens} tokens "
            "each (the report's share); the joint crosscoders train on those, not on live "
            "activations of all 2N models (crossdiff has no live joint source)"
        )
    for i in range(crosscoder_seeds(options)):
        stage = f"joint-crosscoder{seed_suffix(i)}"
        train_joint_crosscoder(runner, stage, joint, options, seed + i, device)


def joint_store(stores: list[Any]) -> Any:
    """The JointSource over the model seeds' stores: every dense model, then every MoE."""
    from crossdiff.activations.joint import joint_source

    order = [(i, 0) for i in range(len(stores))] + [(i, 1) for i in range(len(stores))]
    return joint_source(stores, order)


def train_joint_crosscoder(
    runner: StageRunner, stage: str, joint: Any, options: dict[str, Any], seed: int, device: Any
) -> Any:
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.crosscoder.stage import CrosscoderStageConfig, run_crosscoder_stage

    cc_dir, done = runner.begin(stage, {**options["crosscoder"], "seed": seed})
    if done:
        return CrossCoder.load(cc_dir)
    crosscoder = run_crosscoder_stage(
        CrosscoderStageConfig.from_options(options["crosscoder"]),
        joint.part("train"),
        cc_dir,
        seed=seed,
        device=device,
        evaluate_on=joint.part("heldout"),
    )
    runner.finish(stage)
    return crosscoder


def _pair_diffs(
    out: Path, options: dict[str, dict[str, Any]], data: Any, first: Any = None
) -> list[Any]:
    """One FeatureDiff per crosscoder seed of the main pair (held-out tokens; the first may be
    given)."""
    from crossdiff.analysis import diff_features
    from crossdiff.crosscoder import CrossCoder

    store = ActivationStore(out / "store")
    diffs = [] if first is None else [first]
    for i in range(len(diffs), crosscoder_seeds(options)):
        diffs.append(
            diff_features(
                CrossCoder.load(out / f"crosscoder{seed_suffix(i)}"),
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


def architecture_summary(out: Path, options: dict[str, dict[str, Any]], seed: int) -> Any:
    """The report's `architectures` block: the joint crosscoders' latents attributed per latent
    and the three claims over model seeds (crossdiff.analysis.architectures)."""
    from crossdiff.analysis.architectures import compare_architectures, joint_fit
    from crossdiff.crosscoder import CrossCoder

    n = model_seeds(options)
    stores = [ActivationStore(out / "store")]
    stores += [ActivationStore(out / f"store-seed{i}") for i in range(1, n)]
    heldout = joint_store(stores).part("heldout")
    limit = options["report"].get("max_tokens")
    fits = [
        joint_fit(
            CrossCoder.load(out / f"joint-crosscoder{seed_suffix(i)}"),
            heldout,
            max_tokens=limit,
            seed=seed + i,
        )
        for i in range(crosscoder_seeds(options))
    ]
    return compare_architectures(fits, ["dense"] * n + ["moe"] * n, model_names=heldout.model_names)


def replication_summary(
    out: Path, main: Any, options: dict[str, dict[str, Any]], data: Any, seed: int
) -> dict[str, Any]:
    """The report's `replicates` block (the main pair over crosscoder seeds, with seed
    stability) and, with model seeds, its `architectures` block."""
    from crossdiff.analysis.replicates import replicate_summary

    blocks: dict[str, Any] = {}
    if crosscoder_seeds(options) > 1:
        seeds = [seed + i for i in range(crosscoder_seeds(options))]
        blocks["replicates"] = replicate_summary(_pair_diffs(out, options, data, first=main), seeds)
    if model_seeds(options) > 1:
        blocks["architectures"] = architecture_summary(out, options, seed)
    return blocks
