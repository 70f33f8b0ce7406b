"""Options checked before anything runs: every stage's options of `crossdiff run`, and whether a
crosscoder of the asked size fits in the memory of the device that will train it.

All problems are reported at once, before the first stage writes anything, so a bad crosscoder
option fails in a second rather than after the language models have trained.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from crossdiff.crosscoder.memory import (  # noqa: F401 (re-exported: tests and callers)
    GIB,
    available_memory_bytes,
    check_crosscoder_fits,
    crosscoder_memory_bytes,
)
from crossdiff.plumbing.common import DTYPES, CrossdiffError

REPLICATES_OPTIONS = ("crosscoder_seeds",)
MODEL_SEEDS_OPTIONS = ("n",)
MAX_MODEL_SEEDS = 8
MAX_CROSSCODER_SEEDS = 32


def allowed_options() -> dict[str, set[str]]:
    """The option names each stage of `crossdiff run` accepts: the fields of each stage's config
    (crossdiff/<stage>/stage.py), and the run-wide sections'."""
    from crossdiff.activations.stage import StoreStageConfig
    from crossdiff.crosscoder.stage import CrosscoderStageConfig
    from crossdiff.data.stage import DataStageConfig
    from crossdiff.models.stage import ModelsStageConfig
    from crossdiff.report.stage import ReportStageConfig

    configs = (
        DataStageConfig, ModelsStageConfig, StoreStageConfig, CrosscoderStageConfig,
        ReportStageConfig,
    )  # fmt: skip
    return {
        **{config.STAGE: config.option_names() for config in configs},
        "replicates": set(REPLICATES_OPTIONS),
        "model_seeds": set(MODEL_SEEDS_OPTIONS),
    }


def _partition_option(cc: dict[str, Any]) -> Any:
    """The crosscoder options' DFC partition (None: a standard crosscoder), checked."""
    from crossdiff.crosscoder.stage import CrosscoderStageConfig

    keys = ("architecture", "dfc_exclusive")
    return CrosscoderStageConfig.from_options({k: cc.get(k) for k in keys}).partition()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(problems: list[str], where: str, value: Any, minimum: int = 1) -> None:
    if value is not None and (not _is_int(value) or value < minimum):
        problems.append(f"{where}={value!r} must be an integer >= {minimum}")


def _problem(problems: list[str], where: str, check: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return check(*args, **kwargs)
    except CrossdiffError as err:
        problems.append(f"{where}: {err}")
        return None


def validate_run_options(
    options: dict[str, dict[str, Any]], *, seed: int, device: torch.device, world_size: int = 1
) -> None:
    """Check every stage's options of `crossdiff run`; raise one CrossdiffError naming all the
    problems found (nothing has run or been written when it is raised)."""
    from crossdiff.activations import load_pairing
    from crossdiff.analysis.classes import resolve_split
    from crossdiff.crosscoder import TrainingCrossCoderConfig
    from crossdiff.crosscoder.config import FORK_OPTION_NAMES
    from crossdiff.crosscoder.train import DEFAULT_STEPS
    from crossdiff.data.prepare import DATA_PRESETS
    from crossdiff.models.configs import get_preset

    problems: list[str] = []
    if not _is_int(seed):
        problems.append(f"seed={seed!r} must be an integer")
    for stage, names in allowed_options().items():
        unknown = sorted(set(options.get(stage, {})) - names)
        if unknown:
            problems.append(f"{stage}: unknown option(s) {unknown}; known: {sorted(names)}")

    data = options["data"]
    if data.get("preset", "tiny") not in DATA_PRESETS:
        problems.append(f"data: unknown preset {data.get('preset')!r}; known {list(DATA_PRESETS)}")
    if data.get("source") not in (None, "embedded", "hf"):
        problems.append(f"data: source={data.get('source')!r} must be 'embedded' or 'hf'")
    for key in ("n_chars_per_domain", "vocab_size", "seq_len"):
        _positive_int(problems, f"data: {key}", data.get(key))
    fraction = data.get("heldout_fraction", 0.05)
    if not isinstance(fraction, int | float) or not 0 < fraction < 1:
        problems.append(f"data: heldout_fraction={fraction!r} must be in (0, 1)")

    models = options["models"]
    preset = _problem(problems, "models", get_preset, models.get("preset", "tiny"))
    for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_rows"):
        _positive_int(problems, f"models: {key}", models.get(key))

    store = options["store"]
    pairing = _problem(problems, "store", load_pairing, store.get("pairing", "paper"))
    _positive_int(problems, "store: n_tokens", store.get("n_tokens"))
    if store.get("dtype", "float16") not in DTYPES:
        problems.append(f"store: dtype={store.get('dtype')!r}; expected one of {sorted(DTYPES)}")
    held = store.get("heldout_fraction", 0.1)
    if not isinstance(held, int | float) or not 0 <= held <= 0.5:
        problems.append(f"store: heldout_fraction={held!r} must be in [0, 0.5]")

    seeds = options.get("replicates", {}).get("crosscoder_seeds", 1)
    if not (_is_int(seeds) and 1 <= seeds <= MAX_CROSSCODER_SEEDS):
        problems.append(
            f"replicates: crosscoder_seeds={seeds!r} must be an integer in "
            f"[1, {MAX_CROSSCODER_SEEDS}] (--crosscoder-seeds N trains N crosscoders)"
        )
    n_models = options.get("model_seeds", {}).get("n", 1)
    if not (_is_int(n_models) and 1 <= n_models <= MAX_MODEL_SEEDS):
        problems.append(
            f"model_seeds: n={n_models!r} must be an integer in [1, {MAX_MODEL_SEEDS}] "
            "(--model-seeds N trains N dense and N MoE models; 3 is the smallest N whose "
            "permutation test can reach p = 0.05)"
        )

    cc = options["crosscoder"]
    for key in ("steps", "batch_size"):
        _positive_int(problems, f"crosscoder: {key}", cc.get(key))
    for key in ("checkpoint_every", "k_anneal_steps"):
        _positive_int(problems, f"crosscoder: {key}", cc.get(key), minimum=0)
    aux = cc.get("aux_loss_coefficient")
    if aux is not None and not (isinstance(aux, int | float) and aux >= 0 and math.isfinite(aux)):
        problems.append(f"crosscoder: aux_loss_coefficient={aux!r} must be a number >= 0")
    start, steps = cc.get("threshold_start_step", 1000), cc.get("steps", DEFAULT_STEPS)
    ema = cc.get("threshold_schedule") == "ema"
    if ema and _is_int(start) and _is_int(steps) and start >= steps - 1:
        problems.append(
            f"crosscoder: threshold_schedule='ema' starts after step {start} of {steps}, so "
            "the inference threshold would never be set; lower threshold_start_step"
        )
    lr = cc.get("lr")
    if lr is not None and not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        problems.append(f"crosscoder: lr={lr!r} must be a positive number")
    batch = cc.get("batch_size", 1024)
    n_tokens = store.get("n_tokens")
    if _is_int(batch) and _is_int(n_tokens) and n_tokens < batch:
        problems.append(
            f"store: n_tokens={n_tokens} is fewer than the crosscoder's batch_size={batch}; "
            "harvest more tokens or lower the batch size"
        )
    if cc.get("dtype", "float32") not in DTYPES:
        problems.append(f"crosscoder: dtype={cc.get('dtype')!r}; expected one of {sorted(DTYPES)}")
    expansion = cc.get("expansion", 8)
    if not (isinstance(expansion, int | float) and expansion > 0 and math.isfinite(expansion)):
        problems.append(f"crosscoder: expansion={expansion!r} must be a positive number")
    elif preset is not None and cc.get("dtype", "float32") in DTYPES:
        # the store's width: each site's hook output, concatenated (resid / mlp_out: d_model)
        n_sites = len(pairing.sites) if pairing is not None else 1
        d_store = n_sites * int(preset.model["d_model"])
        d_sae = int(expansion * d_store)
        _problem(
            problems,
            "crosscoder",
            TrainingCrossCoderConfig,
            **{k: cc[k] for k in FORK_OPTION_NAMES if cc.get(k) is not None},
            n_models=2,
            d_model=d_store,
            d_sae=max(d_sae, 1),
            k=cc.get("k", 32),
            n_shared=cc.get("n_shared", 0),
            shared_decoder=cc.get("shared_decoder", "free"),
            shared_penalty_ratio=cc.get("shared_penalty_ratio", 0.7),
            dtype=cc.get("dtype", "float32"),
            partition=_problem(problems, "crosscoder", _partition_option, cc),
        )
        if d_sae < 1:
            problems.append(
                f"crosscoder: expansion={expansion} gives d_sae={d_sae} on width {d_store}; "
                "raise the expansion"
            )
        elif _is_int(batch) and batch > 0:
            too_big = check_crosscoder_fits(
                2, d_store, d_sae, batch, cc.get("dtype", "float32"), device, world_size=world_size
            )
            if too_big:
                problems.append(f"crosscoder: {too_big}")

    if pairing is not None and preset is not None:
        from crossdiff.run.validation_targets import pairing_problems

        problems.extend(pairing_problems(options))

    report = options["report"]
    _problem(problems, "report", resolve_split, report.get("split", "paper"))
    _positive_int(problems, "report: max_tokens", report.get("max_tokens"))
    _positive_int(problems, "report: splice_sequences", report.get("splice_sequences"), minimum=0)
    for key in ("verify_candidates", "verify_sequences"):
        _positive_int(problems, f"report: {key}", report.get(key), minimum=0)

    if problems:
        raise CrossdiffError(
            "the run's options were refused before any stage ran:\n  - " + "\n  - ".join(problems)
        )
