"""The setup of a training run: the training config with the run's options (checked), the
schedule (warm-up, decay, dead-latent window), SAELens's SAETrainerConfig, and the crosscoder it
starts from."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor

from crossdiff.crosscoder.config import CrossCoderConfig, TrainingCrossCoderConfig, default_lr
from crossdiff.crosscoder.training_batches import SAMPLE_TOKENS, geometric_median
from crossdiff.crosscoder.training_sae import TrainingCrossCoder
from crossdiff.plumbing.common import CrossdiffError, allocation_guard, seed_everything
from crossdiff.plumbing.distributed import broadcast_module_

DEFAULT_STEPS = 3000


def training_config(
    cfg: CrossCoderConfig,
    *,
    steps: int | None,
    total_tokens: int | None,
    batch_size: int,
    lr_decay_fraction: float,
    overrides: dict[str, Any],
) -> tuple[int, TrainingCrossCoderConfig]:
    """The number of steps and `cfg` as a training config with the given (non-None) options."""
    if batch_size < 1:
        raise CrossdiffError(f"batch_size={batch_size} must be >= 1")
    if steps is None:
        steps = DEFAULT_STEPS if total_tokens is None else max(1, total_tokens // batch_size)
    if steps < 1:
        raise CrossdiffError(f"steps={steps} must be >= 1")
    if not 0 <= lr_decay_fraction < 1:
        raise CrossdiffError(f"lr_decay_fraction={lr_decay_fraction} must be in [0, 1)")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    tcfg = _config_with(cfg, overrides)
    if tcfg.threshold_schedule == "ema" and tcfg.threshold_start_step >= steps - 1:
        raise CrossdiffError(
            f"threshold_schedule='ema' starts after step threshold_start_step="
            f"{tcfg.threshold_start_step}, but the run has only {steps} steps, so the inference "
            "threshold would never be set; lower threshold_start_step or train longer"
        )
    return steps, tcfg


def _config_with(cfg: CrossCoderConfig, overrides: dict[str, Any]) -> TrainingCrossCoderConfig:
    if isinstance(cfg, TrainingCrossCoderConfig):
        fields = {k: v for k, v in asdict(cfg).items() if k != "metadata"}
        metadata = SAEMetadata(**cfg.metadata.to_dict())
        return TrainingCrossCoderConfig(**(fields | overrides), metadata=metadata)
    if not isinstance(cfg, CrossCoderConfig):
        raise CrossdiffError(f"cfg must be a CrossCoderConfig, got {type(cfg).__name__}")
    return TrainingCrossCoderConfig.from_inference_config(cfg, **overrides)


def trainer_settings(
    tcfg: TrainingCrossCoderConfig,
    dev: torch.device,
    *,
    steps: int,
    batch_size: int,
    lr: float | None,
    lr_warmup_steps: int | None,
    lr_decay_fraction: float,
    dead_after_tokens: int | None,
    normalize: bool,
    seed: int,
    autocast: bool | None,
    log_every: int,
    wandb: bool,
    wandb_project: str,
) -> tuple[dict[str, Any], SAETrainerConfig]:
    """The run's options (recorded in checkpoints and the summary) and SAETrainer's config."""
    lr = default_lr(tcfg.d_sae) if lr is None else lr
    total = steps * batch_size
    dead_tokens = dead_after_tokens or min(10_000_000, max(total // 10, batch_size))
    warmup = max(1, steps // 20) if lr_warmup_steps is None else lr_warmup_steps
    decay = int(steps * lr_decay_fraction)
    if warmup + decay > steps:
        raise CrossdiffError(f"lr_warmup_steps={warmup} plus decay {decay} exceed steps={steps}")
    options = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "lr_warmup_steps": warmup,
        "lr_decay_steps": decay,
        "dead_after_tokens": dead_tokens,
        "normalize": normalize,
        "seed": seed,
    }
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=warmup,
        lr_decay_steps=decay,
        device=str(dev),
        autocast=dev.type == "cuda" if autocast is None else bool(autocast),
        dead_feature_window=math.ceil(dead_tokens / batch_size),
        feature_sampling_window=max(1, min(2000, steps)),
        logger=LoggingConfig(
            log_to_wandb=wandb,
            wandb_project=wandb_project,
            wandb_log_frequency=max(1, log_every),
            eval_every_n_wandb_logs=10,
        ),
    )

    return options, trainer_cfg


def initial_crosscoder(
    tcfg: TrainingCrossCoderConfig,
    source: Any,
    dev: torch.device,
    *,
    seed: int,
    scaled: bool,
    check: bool,
) -> tuple[TrainingCrossCoder, Tensor, Tensor]:
    """The seeded crosscoder with its decoder bias set from a sample of scaled activations (the
    same on every rank), the scaling factors, and that sample."""
    seed_everything(seed)
    # weights, Adam moments and gradients: about 4 copies of encoder and decoder
    n_bytes = 4 * 2 * tcfg.d_sae * tcfg.d_in * torch.finfo(torch.float32).bits // 8
    with allocation_guard(f"a crosscoder with d_sae={tcfg.d_sae}, d_in={tcfg.d_in}", n_bytes):
        sae = TrainingCrossCoder(tcfg).to(dev)
    scale = source.raw_scaling_factors(seed) if scaled else torch.ones(tcfg.n_models)
    sample = source.sample(SAMPLE_TOKENS, seed + 1) * scale[:, None]
    if check:  # the sample sets the decoder bias: one NaN in it would spoil every step
        source.check_finite(sample, "the sample of activations that sets the decoder bias")
    with torch.no_grad():
        if tcfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(sample.to(dev)))
        else:
            sae.b_dec.copy_(sample.mean(0).to(dev))
    broadcast_module_(sae)  # every rank starts from rank 0's weights, whatever its RNG did
    return sae, scale, sample


def wandb_module() -> Any:
    try:
        import wandb as wandb_lib
    except ImportError as err:
        raise CrossdiffError(
            "wandb=True (--wandb) logs to Weights & Biases, but wandb is not installed; "
            "install it with `pip install 'crossdiff[wandb]'` or leave logging off"
        ) from err
    return wandb_lib
