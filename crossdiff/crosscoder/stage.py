"""The crosscoder stage: its config and its `run`, called by `crossdiff train-crosscoder` and by
`crossdiff run` alike (each crosscoder of a run: the main one, the extra seeds', the controls').

`run_crosscoder_stage` builds the CrossCoderConfig for the activations, checks that it fits in
memory, trains (resuming from the checkpoints in OUT/checkpoints), saves the crosscoder in OUT
(cfg.json with its provenance metadata + weights), evaluates it and writes OUT/training.json,
whose `identity` (config, result options, data fingerprint) says when OUT already holds it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossdiff.activations.source import ActivationSource
from crossdiff.crosscoder.train import DEFAULT_STEPS
from crossdiff.plumbing.common import CrossdiffError, read_json, write_json_atomic
from crossdiff.plumbing.stage_config import StageConfig

DEFAULT_EXPANSION = 8
DEFAULT_K = 32
DEFAULT_BATCH_SIZE = 1024
DEFAULT_EVAL_TOKENS = 65536
CHECKPOINTS = "checkpoints"  # OUT/checkpoints; `train-crosscoder` keeps its older OUT/checkpoint
# the crosscoder's own config (CrossCoderConfig); the other fields are training options
CONFIG_OPTIONS = ("k", "n_shared", "shared_decoder", "shared_penalty_ratio", "dtype")
# the seed paper fork's options: passed to train_crosscoder only when given
FORK_OPTION_NAMES = (
    "code_normalization", "code_normalization_alpha", "shared_penalty",
    "shared_sparsity_coefficient", "sparsity_coefficient", "threshold_schedule",
    "threshold_beta", "threshold_start_step", "aux_loss", "recon_loss", "b_dec_init",
)  # fmt: skip
# options that change what is trained or measured (training.json's identity), and the ones that
# count only when given (added later, so earlier outputs keep their identity)
RESULT_OPTIONS = (
    "steps", "batch_size", "lr", "k_anneal_steps", "k_anneal_start", "aux_loss_coefficient",
    "seed", "eval_tokens",
)  # fmt: skip
PASSED_WHEN_GIVEN = (
    "lr_warmup_steps", "lr_decay_fraction", "dead_after_tokens", *FORK_OPTION_NAMES,
)  # fmt: skip
# train_crosscoder's options that do not change the result, passed as they are
_RUNTIME_OPTIONS = (
    "total_tokens", "normalize", "checkpoint_every", "log_every", "wandb", "wandb_project",
    "autocast", "prefetch",
)  # fmt: skip


@dataclass(frozen=True)
class CrosscoderStageConfig(StageConfig):
    """One crosscoder's options: a run preset's "crosscoder" section, or train-crosscoder's flags.
    Defaults reach FVE >= 0.8 per model at L0 <= 64 on the tiny models in a few CPU minutes."""

    STAGE = "crosscoder"

    expansion: int | float = DEFAULT_EXPANSION  # d_sae = expansion * d_model, unless d_sae is given
    d_sae: int | None = None
    k: int | float = DEFAULT_K
    n_shared: int = 0
    shared_decoder: str = "free"
    shared_penalty_ratio: int | float = 0.7
    dtype: str = "float32"
    # "standard" or "dfc" (Dedicated Feature Crosscoder); dfc_exclusive: each model's exclusive
    # latents, as a fraction of d_sae (default 0.05, the DFC reference code's) or counts
    architecture: str = "standard"
    dfc_exclusive: int | float | tuple[int, ...] | list[int] | None = None
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: int | float | None = None
    lr_warmup_steps: int | None = None
    lr_decay_fraction: int | float | None = None
    k_anneal_steps: int = 0
    k_anneal_start: int | float | None = None
    aux_loss_coefficient: int | float | None = None
    dead_after_tokens: int | None = None
    code_normalization: str | None = None
    code_normalization_alpha: int | float | None = None
    shared_penalty: str | None = None
    shared_sparsity_coefficient: int | float | None = None
    sparsity_coefficient: int | float | None = None
    threshold_schedule: str | None = None
    threshold_beta: int | float | None = None
    threshold_start_step: int | None = None
    aux_loss: str | None = None
    recon_loss: str | None = None
    b_dec_init: str | None = None
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    eval_part: str | None = None
    total_tokens: int | None = None
    normalize: bool = True
    checkpoint_every: int = 500
    log_every: int = 100
    wandb: bool = False
    wandb_project: str = "crossdiff"
    autocast: bool | None = None
    prefetch: int | None = None  # train_crosscoder's default (0 for a tensor on the CPU, else 2)

    def d_sae_for(self, d_model: int) -> int:
        return self.d_sae if self.d_sae is not None else int(round(self.expansion * d_model))

    def crosscoder_config(self, source: ActivationSource) -> Any:
        """The CrossCoderConfig for activations of `source`'s models and widths."""
        from crossdiff.crosscoder.config import CrossCoderConfig, store_widths

        return CrossCoderConfig(
            n_models=source.n_models,
            d_model=source.d_model,
            d_models=store_widths(source),
            d_sae=self.d_sae_for(source.d_model),
            partition=self.partition(),
            **{k: getattr(self, k) for k in CONFIG_OPTIONS},
        )

    def partition(self) -> Any:
        """CrossCoderConfig's `partition`: None for a standard crosscoder; for a DFC the
        per-model exclusive counts or fraction (default DFC_EXCLUSIVE_FRACTION)."""
        from crossdiff.crosscoder.partition import ARCHITECTURES, DFC_EXCLUSIVE_FRACTION

        if self.architecture not in ARCHITECTURES:
            raise CrossdiffError(
                f"architecture={self.architecture!r}; expected one of {ARCHITECTURES} "
                "(dfc: a Dedicated Feature Crosscoder, docs/crosscoder.md)"
            )
        if self.architecture == "standard":
            if self.dfc_exclusive is not None:
                raise CrossdiffError(
                    f"dfc_exclusive={self.dfc_exclusive!r} applies only with "
                    "architecture='dfc'; set architecture='dfc' or leave dfc_exclusive out"
                )
            return None
        value = DFC_EXCLUSIVE_FRACTION if self.dfc_exclusive is None else self.dfc_exclusive
        return tuple(value) if isinstance(value, list | tuple) else value

    def training_options(self) -> dict[str, Any]:
        """train_crosscoder's keyword options (the seed, device and checkpoints aside)."""
        always = ("steps", "batch_size", "lr", "k_anneal_steps", "k_anneal_start",
                  "aux_loss_coefficient", *_RUNTIME_OPTIONS)  # fmt: skip
        given = {k: getattr(self, k) for k in PASSED_WHEN_GIVEN if getattr(self, k) is not None}
        return {k: getattr(self, k) for k in always} | given


def identity(cfg: Any, config: CrosscoderStageConfig, seed: int, data_print: str) -> Any:
    """What a finished OUT must match to count as done: config, options, data fingerprint."""
    from crossdiff.plumbing.fingerprint import canonical

    cc_config = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "metadata")}
    options = {k: getattr(config, k) for k in RESULT_OPTIONS if k != "seed"} | {"seed": seed}
    options = {k: options[k] for k in RESULT_OPTIONS}  # the order training.json always had
    options |= {k: getattr(config, k) for k in PASSED_WHEN_GIVEN if getattr(config, k) is not None}
    return canonical({"config": cc_config, "options": options, "store": data_print})


def _data_fingerprint(source: ActivationSource) -> str:
    from crossdiff.activations.live import LiveActivations
    from crossdiff.plumbing.fingerprint import store_fingerprint

    return source.fingerprint if isinstance(source, LiveActivations) else store_fingerprint(source)


def start_over(out: Path, checkpoints: str = CHECKPOINTS) -> None:
    """Remove OUT's crosscoder, record and checkpoints, so nothing of them is resumed or kept."""
    shutil.rmtree(out / checkpoints, ignore_errors=True)
    for name in ("training.json", "cfg.json", "sae_weights.safetensors"):
        (out / name).unlink(missing_ok=True)


def run_crosscoder_stage(
    config: CrosscoderStageConfig,
    source: ActivationSource,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: Any = "auto",
    evaluate_on: ActivationSource | None = None,
    resume: bool = True,
    overwrite: bool = False,
    checkpoints: str = CHECKPOINTS,
) -> Any:
    """Train the crosscoder of `config` on `source` (an ActivationSource: a store, or
    LiveActivations with the store to evaluate on as `evaluate_on`) into `out_dir`; the
    CrossCoder. OUT already holding this crosscoder (training.json's identity) is loaded;
    holding another one is an error unless `overwrite`."""
    from crossdiff.crosscoder import CrossCoder, train_crosscoder
    from crossdiff.crosscoder.folder import WEIGHTS_FILE
    from crossdiff.crosscoder.memory import check_crosscoder_fits
    from crossdiff.plumbing.distributed import barrier, compute_device, dist_info
    from crossdiff.plumbing.fingerprint import describe_changes

    info = dist_info()
    out = Path(out_dir)
    cfg = config.crosscoder_config(source)
    too_big = check_crosscoder_fits(
        cfg.n_models, cfg.d_model, cfg.d_sae, config.batch_size, cfg.dtype,
        compute_device(str(device)), world_size=info.world_size,
    )  # fmt: skip
    if too_big:
        raise CrossdiffError(f"crosscoder: {too_big}")
    ident = identity(cfg, config, seed, _data_fingerprint(source))
    if (out / "training.json").exists() and not overwrite:
        previous = read_json(out / "training.json", "training record").get("identity")
        if previous != ident:
            changed = (
                describe_changes(previous, ident)
                if previous
                else "its record predates fingerprints"
            )
            raise CrossdiffError(
                f"{out} holds a crosscoder trained with other settings or another store "
                f"({changed}); pass --overwrite to train again from the start, or choose another "
                "--out"
            )
        if (out / "cfg.json").exists() and (out / WEIGHTS_FILE).exists():
            print(f"crosscoder: {out} is already trained with these settings; --overwrite to redo")
            return CrossCoder.load(out)
        # the record is this crosscoder's but its files are gone: train again (from checkpoints)
    barrier()  # every rank has read OUT before rank 0 clears it
    if info.is_main and (out / "stage.json").exists():  # a finished `crossdiff run` crosscoder
        from crossdiff.plumbing.stage_marker import mark_written_by

        mark_written_by(out, "crossdiff train-crosscoder")
    if overwrite and info.is_main:
        start_over(out, checkpoints)
        print(f"crosscoder: --overwrite: removed the crosscoder and checkpoints in {out}")
    barrier()
    cc = train_crosscoder(
        source,
        cfg,
        seed=seed,
        device=str(device),
        checkpoint_dir=out / checkpoints,
        resume=resume,
        **config.training_options(),
    )
    if info.is_main:  # every rank holds the same crosscoder; rank 0 writes it
        cc.save(out)
        _write_training_record(cc, config, out, source, evaluate_on, ident, seed, device)
    return cc


def _write_training_record(
    cc: Any,
    config: CrosscoderStageConfig,
    out: Path,
    source: ActivationSource,
    evaluate_on: ActivationSource | None,
    ident: Any,
    seed: int,
    device: Any,
) -> None:
    from crossdiff.crosscoder import evaluate_crosscoder

    store = source if evaluate_on is None else evaluate_on
    metrics = evaluate_crosscoder(cc, store, max_tokens=config.eval_tokens, part=config.eval_part)
    summary = dict(cc.training_summary)
    history = summary.pop("history")
    record = {
        "store": str(getattr(store, "path", None)),
        "identity": ident,
        "config": cc.cfg.to_dict(),
        "options": {**dataclasses.asdict(config), "seed": seed, "device": str(device)},
        "metrics": metrics,
        "training": summary,
        "history": history,
    }
    write_json_atomic(out / "training.json", json.loads(json.dumps(record, default=str)))
    per_model = ", ".join(f"{v:.3f}" for v in metrics["fve_per_model"])
    print(
        f"crosscoder: FVE {metrics['fve']:.3f} (per model {per_model}; pooled in normalized "
        f"units {metrics['fve_pooled_normalized']:.3f}), L0 {metrics['l0']:.1f} "
        f"(top-k {metrics['l0_topk']:.1f}), dead {metrics['dead_fraction']:.1%} "
        f"on {metrics['n_tokens']} {metrics['evaluated_on']} tokens "
        f"(trained on {summary['n_train_tokens']} {summary['trained_on']} tokens)"
    )
    print(f"crosscoder: wrote {out}/cfg.json, {out}/sae_weights.safetensors, {out}/training.json")
