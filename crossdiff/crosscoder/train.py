"""train_crosscoder: SAELens's SAETrainer with crossdiff's data providers and checkpoints.

Training runs on scaled activations (each model's mean norm brought to sqrt(its width); or raw ones
with normalize=False); at the end the factors are folded into the weights, so the returned
CrossCoder works on raw activations.
Checkpoints are safetensors + JSON (never pickle), written atomically; `resume=True` continues a
run from the last one.

Under torchrun every rank reads the same seeded stream of global batches and trains on its own
slice of each; gradients are all-reduced before clipping, firing counts are all-reduced so the
dead-latent mask agrees, and the threshold update is global (see training_sae.py). Rank 0 writes
the checkpoints; one written by N ranks resumes on any number of processes.

The parts: training_batches.py (where batches come from), training_plan.py (the run's checked
settings and the crosscoder it starts from), sae_trainer.py (the SAETrainer subclass),
prefetch.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from crossdiff.activations.live import LiveActivations
from crossdiff.activations.source import ActivationSource, check_activations
from crossdiff.crosscoder.checkpoint import (
    read_checkpoint,
    restore_checkpoint,
    run_identity,
)
from crossdiff.crosscoder.config import CrossCoderConfig
from crossdiff.crosscoder.metrics import evaluate_crosscoder
from crossdiff.crosscoder.model import CrossCoder
from crossdiff.crosscoder.prefetch import prefetch_to_device
from crossdiff.crosscoder.provenance import record_provenance
from crossdiff.crosscoder.sae_trainer import CrossCoderTrainer
from crossdiff.crosscoder.training_batches import _LiveSource as _LiveSource  # re-exported
from crossdiff.crosscoder.training_batches import _StoreSource as _StoreSource  # re-exported
from crossdiff.crosscoder.training_batches import _TensorSource as _TensorSource  # re-exported
from crossdiff.crosscoder.training_batches import (
    geometric_median as geometric_median,  # re-exported
)
from crossdiff.crosscoder.training_batches import training_source
from crossdiff.crosscoder.training_plan import DEFAULT_STEPS as DEFAULT_STEPS  # re-exported
from crossdiff.crosscoder.training_plan import (
    initial_crosscoder,
    trainer_settings,
    training_config,
    wandb_module,
)
from crossdiff.plumbing.api_checks import check_positive
from crossdiff.plumbing.common import CrossdiffError, check_seed
from crossdiff.plumbing.distributed import (
    compute_device,
    dist_info,
)
from crossdiff.plumbing.fingerprint import store_fingerprint
from crossdiff.plumbing.integrity import check_finite_module

# the public function form of the method: fold_scaling_factors(cc, factors) -> cc
fold_scaling_factors = CrossCoder.fold_scaling_factors


def _crosscoder_bar(*args: Any, **kwargs: Any) -> Any:
    """crossdiff's one progress bar for a training run (rank 0 only)."""
    kwargs |= {"desc": "crosscoder", "unit": "tok", "unit_scale": True}
    kwargs["mininterval"] = 0.1 if sys.stderr.isatty() else 10.0  # a log: every 10 s
    if not dist_info().is_main:  # rank 0 leaves `disable` to tqdm (TQDM_DISABLE, ...)
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)


def train_crosscoder(
    acts: Tensor | ActivationSource,
    cfg: CrossCoderConfig,
    *,
    steps: int | None = None,
    total_tokens: int | None = None,
    batch_size: int = 1024,
    lr: float | None = None,
    lr_warmup_steps: int | None = None,
    lr_decay_fraction: float = 0.2,
    k_anneal_steps: int | None = None,
    k_anneal_start: float | None = None,
    aux_loss_coefficient: float | None = None,
    dead_after_tokens: int | None = None,
    code_normalization: str | None = None,
    code_normalization_alpha: float | None = None,
    shared_penalty: str | None = None,
    shared_sparsity_coefficient: float | None = None,
    sparsity_coefficient: float | None = None,
    threshold_schedule: str | None = None,
    threshold_beta: float | None = None,
    threshold_start_step: int | None = None,
    aux_loss: str | None = None,
    recon_loss: str | None = None,
    b_dec_init: str | None = None,
    normalize: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    log_every: int = 100,
    wandb: bool = False,
    wandb_project: str = "crossdiff",
    autocast: bool | None = None,
    prefetch: int | None = None,
) -> CrossCoder:
    """Train a crosscoder on paired activations; return it ready for raw activations.

    acts: a tensor [n_tokens, n_models, d_model] (raw activations), an ActivationStore, or a
    LiveActivations (the models run while it trains; the same crosscoder as from the store).
    steps / total_tokens: training length (default 3000 steps). lr: default 2e-4 / sqrt(d_sae /
    2**14). Warm-up over lr_warmup_steps (default 5% of steps), linear decay to 0 over the last
    lr_decay_fraction of steps. k_anneal_*: BatchTopK k from k_anneal_start down to cfg.k over the
    first k_anneal_steps. dead_after_tokens: a latent that has not fired for this many tokens gets
    the auxiliary loss (default min(10M, total_tokens / 10)). normalize: scale each model's
    activations to mean norm sqrt(d_model) while training (sqrt(width) per model for cfg.d_models;
    a store uses its own scaling factors); False trains on raw activations, as the seed paper's
    fork does, so the relative norm leans toward the model with the larger residual stream.
    The seed paper's fork options (each None keeps cfg's value or crossdiff's default; see
    TrainingCrossCoderConfig and docs/crosscoder.md): code_normalization,
    code_normalization_alpha and shared_penalty set the crosscoder's config (they change its
    selection, so they go into its cfg.json); shared_sparsity_coefficient, sparsity_coefficient,
    threshold_schedule, threshold_beta, threshold_start_step, aux_loss, recon_loss and b_dec_init
    ("mean" or "geometric_median" of the sample that sets the decoder bias) are training options.
    checkpoint_dir: where to write checkpoints every `checkpoint_every` steps; with `resume`, an
    existing checkpoint there is continued. The summary of the run is in `cc.training_summary`.
    autocast: compute the dense encoder matmul in bfloat16 (torch.autocast; weights, optimizer
    state, selection, loss and metrics stay float32); default on for CUDA, off elsewhere.
    prefetch: batches read and checked ahead by a background thread (pinned and copied
    asynchronously on CUDA). Default 2, except 0 for an in-memory tensor trained on the CPU,
    where a batch is a cheap gather and a second thread would only compete for the cores.
    Under torchrun, `batch_size` is the global batch; each of the N processes trains on
    batch_size / N rows of it and the result is the same crosscoder (see the module docstring).
    """
    check_activations(acts, "train_crosscoder")
    check_positive(lr, "lr", "train_crosscoder", allow_none=True)
    seed = check_seed(seed, "train_crosscoder: seed")
    steps, tcfg = training_config(
        cfg,
        steps=steps,
        total_tokens=total_tokens,
        batch_size=batch_size,
        lr_decay_fraction=lr_decay_fraction,
        overrides={
            "aux_loss_coefficient": aux_loss_coefficient,
            "k_anneal_steps": k_anneal_steps,
            "k_anneal_start": k_anneal_start,
            "code_normalization": code_normalization,
            "code_normalization_alpha": code_normalization_alpha,
            "shared_penalty": shared_penalty,
            "shared_sparsity_coefficient": shared_sparsity_coefficient,
            "sparsity_coefficient": sparsity_coefficient,
            "threshold_schedule": threshold_schedule,
            "threshold_beta": threshold_beta,
            "threshold_start_step": threshold_start_step,
            "aux_loss": aux_loss,
            "recon_loss": recon_loss,
            "b_dec_init": b_dec_init,
        },
    )
    info = dist_info()
    dev = compute_device(device)
    if batch_size % info.world_size:
        raise CrossdiffError(
            f"batch_size={batch_size} does not split evenly over {info.world_size} processes; "
            "use a batch size divisible by the number of processes"
        )
    wandb = wandb and info.is_main
    source = training_source(acts, tcfg, batch_size)
    options, trainer_cfg = trainer_settings(
        tcfg,
        dev,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_warmup_steps=lr_warmup_steps,
        lr_decay_fraction=lr_decay_fraction,
        dead_after_tokens=dead_after_tokens,
        normalize=normalize,
        seed=seed,
        autocast=autocast,
        log_every=log_every,
        wandb=wandb,
        wandb_project=wandb_project,
    )

    is_store = not isinstance(acts, Tensor)
    is_live = isinstance(acts, LiveActivations)
    sae, scale, sample = initial_crosscoder(
        tcfg, source, dev, seed=seed, scaled=normalize, check=is_store
    )
    eval_sample = sample[:4096].to(dev)
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    extra_state: dict[str, Any] = {"options": options, "scaling_factors": scale.tolist()}
    if ckpt_dir is not None:  # what a checkpoint must match to be resumed
        data_print = acts.fingerprint if is_live else store_fingerprint(acts)
        extra_state["identity"] = run_identity(tcfg, options, data_print)
    if is_live:  # the cursor: a resume replays the seeded shuffle of token indices to it
        extra_state["live"] = {"shuffle_seed": seed, "tokens_per_step": batch_size}
    trainer = CrossCoderTrainer(
        trainer_cfg,
        sae,
        iter(()),
        evaluator=lambda model, *_: {
            f"eval/{k}": v
            for k, v in evaluate_crosscoder(model, eval_sample).items()
            if isinstance(v, (int, float))
        },
        checkpoint_dir=ckpt_dir,
        checkpoint_every=checkpoint_every if ckpt_dir is not None else 0,
        log_every=max(1, log_every),
        extra_state=extra_state,
        progress_bar=_crosscoder_bar,
    )
    start_step = 0
    if ckpt_dir is not None and resume and (found := read_checkpoint(ckpt_dir)) is not None:
        restore_checkpoint(trainer, *found, identity=extra_state["identity"])
        check_finite_module(
            trainer.sae,
            f"the checkpoint in {ckpt_dir}",
            f"it was damaged; delete {ckpt_dir} to train from the start",
        )
        scale = torch.tensor(found[0]["scaling_factors"])
        start_step = trainer.n_training_steps
        if info.is_main:
            print(f"crosscoder: resuming from {ckpt_dir} at step {start_step}/{steps}")
    if is_store:
        trainer.data_description = (
            "the live activations" if is_live else f"store {getattr(acts, 'path', '(in memory)')}"
        )
    batches = source.batches(batch_size, scale, seed=seed, start_step=start_step, part=info)
    if prefetch is None:
        prefetch = 0 if dev.type == "cpu" and not is_store else 2
    trainer.data_provider = prefetch_to_device(batches, dev, depth=prefetch)

    if wandb:
        wandb_lib = wandb_module()
        wandb_lib.init(project=wandb_project, config={"cfg": tcfg.to_dict(), **options})
    started = time.perf_counter()
    try:
        trainer.fit()
        trainer.check_finite()
    finally:
        trainer.data_provider.close()  # stops the prefetch thread
    seconds = time.perf_counter() - started
    if wandb:
        wandb_lib.finish()
    if ckpt_dir is not None:
        trainer.save_checkpoint()

    cc = trainer.sae.to_inference()
    fold_scaling_factors(cc, scale)
    trained_tokens = (steps - start_step) * batch_size
    summary = {
        **options,
        "scaling_factors": scale.tolist(),
        "resumed_from_step": start_step,
        "train_seconds": seconds,
        "tokens_per_second": trained_tokens / seconds if seconds > 0 else None,
        "final_threshold": float(cc.threshold),
        # which tokens it trained on: a store's training part ("train"), or a tensor ("given")
        "trained_on": getattr(source, "part", None) or "given",
        "n_train_tokens": source.n_tokens,
    }
    cc.cfg.metadata.crossdiff_training = summary
    record_provenance(cc.cfg.metadata, acts)  # model and hook names, store and tokenizer
    cc.training_summary = {**summary, "history": trainer.history}
    return cc
