"""train_crosscoder: SAELens's SAETrainer with crossdiff's data providers and checkpoints.

Training runs on scaled activations (each model's mean norm brought to sqrt(its width)); at the end
the factors are folded into the weights, so the returned CrossCoder works on raw activations.
Checkpoints are safetensors + JSON (never pickle), written atomically; `resume=True` continues a
run from the last one.

Under torchrun every rank reads the same seeded stream of global batches and trains on its own
slice of each; gradients are all-reduced before clipping, firing counts are all-reduced so the
dead-latent mask agrees, and the threshold update is global (see training.py). Rank 0 writes the
checkpoints; one written by N ranks resumes on any number of processes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata, TrainStepInput, TrainStepOutput
from sae_lens.training import sae_trainer as sae_trainer_module
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor
from tqdm.auto import tqdm

from crossdiff.activations.live import LiveActivations
from crossdiff.activations.store import training_part
from crossdiff.common import CrossdiffError, allocation_guard, seed_everything
from crossdiff.crosscoder.checkpoint import (
    read_checkpoint,
    restore_checkpoint,
    run_identity,
    write_checkpoint,
)
from crossdiff.crosscoder.config import CrossCoderConfig, TrainingCrossCoderConfig, default_lr
from crossdiff.crosscoder.metrics import check_finite, check_zero_padding, evaluate_crosscoder
from crossdiff.crosscoder.model import CrossCoder
from crossdiff.crosscoder.prefetch import prefetch_to_device
from crossdiff.crosscoder.provenance import record_provenance
from crossdiff.crosscoder.training import TrainingCrossCoder
from crossdiff.distributed import (
    DistInfo,
    all_reduce_max_,
    all_reduce_sum_,
    broadcast_module_,
    compute_device,
    dist_info,
    shard_rows,
)
from crossdiff.fingerprint import store_fingerprint
from crossdiff.integrity import check_finite_module, locate_nonfinite_in_store

_SAMPLE_TOKENS = 65536  # tokens used to estimate scaling factors and the initial decoder bias
DEFAULT_STEPS = 3000


def fold_scaling_factors(cc: CrossCoder, scaling_factors: Float[Tensor, " n_models"]) -> CrossCoder:
    """Fold per-model activation scaling factors into `cc` (in place) and return it.

    A crosscoder trained on x_m * scaling_factors[m] then gives the same latents on raw x_m, and
    reconstructions equal to the scaled ones divided by scaling_factors[m].
    """
    cc.fold_scaling_factors(scaling_factors)
    return cc


GEOMETRIC_MEDIAN_MAX_ITER = 100
GEOMETRIC_MEDIAN_TOL = 1e-5


@torch.no_grad()
def geometric_median(
    points: Float[Tensor, "n n_models d_model"],
    *,
    max_iter: int = GEOMETRIC_MEDIAN_MAX_ITER,
    tol: float = GEOMETRIC_MEDIAN_TOL,
) -> Float[Tensor, "n_models d_model"]:
    """Each model's geometric median (the point of least summed Euclidean distance to its
    points), by Weiszfeld's iteration from the mean: at most `max_iter` steps, stopping once
    no model's estimate moves by `tol` or more. Deterministic; distances are floored at 1e-12 so
    a point on the estimate cannot divide by zero."""
    points = points.float()
    guess = points.mean(0)
    for _ in range(max_iter):
        weights = 1 / (points - guess).norm(dim=-1).clamp_min(1e-12)  # [n, n_models]
        weights = weights / weights.sum(0)
        previous, guess = guess, torch.einsum("nm,nmd->md", weights, points)
        if float((guess - previous).norm(dim=-1).max()) < tol:
            break
    return guess


class _TensorSource:
    """Activations held in memory: [N, n_models, d_model], shuffled per epoch with a seed."""

    def __init__(self, acts: Tensor, cfg: CrossCoderConfig, batch_size: int):
        if acts.ndim != 3 or tuple(acts.shape[1:]) != (cfg.n_models, cfg.d_model):
            raise CrossdiffError(
                f"activations have shape {tuple(acts.shape)}; expected [n_tokens, "
                f"n_models={cfg.n_models}, d_model={cfg.d_model}] (stack the models on dim 1)"
            )
        if not acts.is_floating_point():
            raise CrossdiffError(f"activations have dtype {acts.dtype}; expected a float dtype")
        if acts.shape[0] < batch_size:
            raise CrossdiffError(
                f"only {acts.shape[0]} tokens for batch_size={batch_size}; lower batch_size "
                "or give more activations"
            )
        check_finite(acts, "the activations tensor")
        check_zero_padding(acts, cfg)
        self.widths = cfg.widths if cfg.padded else None
        self.acts = acts
        self.n_tokens = acts.shape[0]

    def sample(self, n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(self.n_tokens, generator=g)[: min(n, self.n_tokens)]
        return self.acts[rows].float()

    def raw_scaling_factors(self, seed: int) -> Tensor:
        sample = self.sample(_SAMPLE_TOKENS, seed)
        mean_norm = sample.norm(dim=-1).mean(0)
        if bool((mean_norm == 0).any()):
            raise CrossdiffError("a model's activations are all zero; check the harvest")
        if self.widths is not None:  # each model to mean norm sqrt(its own width)
            return torch.tensor(self.widths, dtype=torch.float32).sqrt() / mean_norm
        return sample.shape[-1] ** 0.5 / mean_norm

    def batches(
        self, batch_size: int, scale: Tensor, *, seed: int, start_step: int, part: DistInfo
    ) -> Iterator[Tensor]:
        """Scaled float32 batches on the CPU: this rank's slice of each global batch."""
        per_epoch = self.n_tokens // batch_size
        step = start_step
        scale = scale.to(self.acts.device)[:, None]
        while True:
            epoch, first = divmod(step, per_epoch)
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n_tokens, generator=g)
            for j in range(first, per_epoch):
                rows = shard_rows(perm[j * batch_size : (j + 1) * batch_size], part)
                yield (self.acts[rows].to(torch.float32) * scale).cpu()
            step = (epoch + 1) * per_epoch


class _StoreSource:
    """An ActivationStore (duck-typed): iter_batches yields scaled [batch, n_models, d] tensors."""

    def __init__(self, store: Any, cfg: CrossCoderConfig, batch_size: int):
        store = training_part(store)  # never the held-out part
        widths = tuple(getattr(store, "d_models", None) or [store.d_model] * store.n_models)
        if (store.n_models, store.d_model) == (cfg.n_models, cfg.d_model) and widths != tuple(
            cfg.widths
        ):
            kind = "different widths" if len(set(widths)) > 1 else "equal widths"
            raise CrossdiffError(
                f"the store's models have {kind} d_models={list(widths)} (padded to "
                f"{store.d_model}) but the config says d_models={list(cfg.widths)}; pass "
                f"CrossCoderConfig(d_models={tuple(widths)}, ...)"
            )
        if (store.n_models, store.d_model) != (cfg.n_models, cfg.d_model):
            raise CrossdiffError(
                f"the store holds n_models={store.n_models}, d_model={store.d_model} but the "
                f"config says n_models={cfg.n_models}, d_model={cfg.d_model}; make them agree"
            )
        if store.n_tokens < batch_size:
            raise CrossdiffError(
                f"the store has {store.n_tokens} tokens, fewer than batch_size={batch_size}"
            )
        self.store = store
        self.n_tokens = store.n_tokens
        self.part = getattr(store, "part_name", None)
        self.d = (store.n_models, store.d_model)

    def raw_scaling_factors(self, seed: int) -> Tensor:
        return torch.as_tensor(self.store.scaling_factors, dtype=torch.float32)

    def sample(self, n: int, seed: int) -> Tensor:
        """Raw (unscaled) activations, shuffled."""
        n = min(n, self.n_tokens)
        it = self.store.iter_batches(n, seed=seed, shuffle=True, normalize=False, loop=False)
        return next(iter(it)).float()

    def batches(
        self, batch_size: int, scale: Tensor, *, seed: int, start_step: int, part: DistInfo
    ) -> Iterator[Tensor]:
        """Scaled float32 batches on the CPU: this rank's slice of each global batch."""
        # The store scales with its own factors, which are `scale` (normalize=True). A resumed
        # run replays the same seeded stream and discards the batches it has already trained on,
        # so it sees exactly the batches an uninterrupted run sees; that costs re-reading them
        # (disk reads only, no compute).
        it = self.store.iter_batches(
            batch_size, seed=seed, shuffle=True, normalize=True, loop=True, dtype=torch.float32
        )
        for _ in range(start_step):
            next(it)
        for i, batch in enumerate(it):
            if tuple(batch.shape) != (batch_size, *self.d):
                raise CrossdiffError(
                    f"the store yielded a batch of shape {tuple(batch.shape)} at step "
                    f"{start_step + i}; expected {(batch_size, *self.d)}. The store may be "
                    "truncated or corrupt: re-harvest it"
                )
            self.check_finite(batch, f"the store batch of training step {start_step + i}")
            yield shard_rows(batch, part)

    def check_finite(self, batch: Tensor, what: str) -> None:
        """Refuse NaN/inf activations, saying where in the store the first one is."""
        try:
            check_finite(batch, what)
        except CrossdiffError as err:
            if not hasattr(self.store, "manifest"):
                raise
            print(
                "crossdiff: locating the first non-finite activation in the store (one read)",
                file=sys.stderr,
            )
            raise CrossdiffError(
                f"{what} has a non-finite activation; the first one in store "
                f"{getattr(self.store, 'path', '')} is at {locate_nonfinite_in_store(self.store)}. "
                "Harvest the store again (or remove those tokens) before training"
            ) from err


class _LiveSource(_StoreSource):
    """A LiveActivations source: the store's interface, but a resumed run skips the batches it
    has trained on without running the models, and each rank computes only its rows."""

    def batches(
        self, batch_size: int, scale: Tensor, *, seed: int, start_step: int, part: DistInfo
    ) -> Iterator[Tensor]:
        """Scaled float32 batches on the CPU: this rank's slice of each global batch."""
        it = self.store.iter_batches(
            batch_size, seed=seed, shuffle=True, normalize=True, loop=True, skip=start_step,
            part=part,
        )  # fmt: skip
        for i, batch in enumerate(it):
            self.check_finite(batch, f"the live batch of training step {start_step + i}")
            yield batch


class CrossCoderTrainer(SAETrainer):
    """SAELens's trainer with crossdiff's checkpoints (safetensors + JSON) and progress log."""

    def __init__(
        self,
        *args: Any,
        checkpoint_dir: Path | None,
        checkpoint_every: int,
        log_every: int,
        extra_state: dict[str, Any],
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.extra_state = extra_state
        self.history: list[dict[str, float]] = []
        self.data_description = "the training activations"
        # the first step whose loss was NaN/inf (-1: none); kept on the device, read at log steps
        self._nonfinite_step: Tensor | None = None

    def check_finite(self) -> None:
        """Stop with the step at fault if a loss or a weight has become NaN or infinite."""
        local = self._nonfinite_step
        if local is None:
            local = torch.full((), -1, dtype=torch.long, device=self.sae.W_enc.device)
        # every rank calls this at the same steps; all stop together, so none waits on the others
        bad_step = int(all_reduce_max_(local.clone()))
        advice = (
            "training diverged: lower the learning rate (lr), check the activations for huge "
            "values, or resume from an earlier checkpoint"
        )
        if bad_step >= 0:
            raise CrossdiffError(
                f"the crosscoder loss became non-finite at training step {bad_step} (its batch "
                f"from {self.data_description} was finite, so the weights diverged); {advice}"
            )
        check_finite_module(
            self.sae, f"the crosscoder after {self.n_training_steps} training steps", advice
        )

    def save_checkpoint(
        self, checkpoint_name: str = "", base_path: Any = None, wandb_aliases: Any = None
    ) -> None:
        self.check_finite()  # never write a checkpoint that would resume into NaN
        if self.checkpoint_dir is not None and dist_info().is_main:
            write_checkpoint(self, self.checkpoint_dir, self.extra_state)

    def fit(self) -> Any:
        # SAETrainer.fit opens its own "Training SAE" bar through its module's `tqdm`; for the
        # length of the call that name makes crossdiff's one bar instead (rank 0 only)
        def crosscoder_bar(*args: Any, **kwargs: Any) -> Any:
            kwargs |= {"desc": "crosscoder", "unit": "tok", "unit_scale": True}
            kwargs["mininterval"] = 0.1 if sys.stderr.isatty() else 10.0  # a log: every 10 s
            if not dist_info().is_main:  # rank 0 leaves `disable` to tqdm (TQDM_DISABLE, ...)
                kwargs["disable"] = True
            return tqdm(*args, **kwargs)

        saelens_tqdm = sae_trainer_module.tqdm
        sae_trainer_module.tqdm = crosscoder_bar
        try:
            return super().fit()
        finally:
            sae_trainer_module.tqdm = saelens_tqdm

    def step(self, batch: Tensor) -> TrainStepOutput:
        output = super().step(batch)
        # SAETrainer counts the rows it was given; a rank gets 1/N of the global batch
        self.n_training_samples += self.cfg.train_batch_size_samples - batch.shape[0]
        return output

    def _train_step(self, sae: Any, sae_in: Tensor) -> TrainStepOutput:
        """SAETrainer's step, made data-parallel and free of host synchronisation: firing
        counts and gradients are summed over ranks, so every rank takes the same step."""
        sae.train()
        with self.autocast_if_enabled:
            output = sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=sae_in,
                    dead_neuron_mask=self.dead_neurons,
                    coefficients=self.get_coefficients(),
                    n_training_steps=self.n_training_steps,
                    is_logging_step=self._is_logging_step(),
                )
            )
        with torch.no_grad():
            bad = ~torch.isfinite(output.loss.detach())
            step = torch.full_like(bad, self.n_training_steps, dtype=torch.long)
            if self._nonfinite_step is None:
                self._nonfinite_step = torch.full_like(step, -1)
            first = bad & (self._nonfinite_step < 0)
            self._nonfinite_step = torch.where(first, step, self._nonfinite_step)
            fired = all_reduce_sum_((output.feature_acts > 0).sum(0).float())
            since = self.n_forward_passes_since_fired
            self.n_forward_passes_since_fired = torch.where(fired > 0, 0, since + 1).to(since)
            self.act_freq_scores += fired
            self.n_frac_active_samples += self.cfg.train_batch_size_samples
        output.loss.backward()
        world = dist_info().world_size
        if world > 1:
            for p in sae.parameters():
                if p.grad is not None:
                    all_reduce_sum_(p.grad).div_(world)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        return output

    def _checkpoint_if_needed(self) -> None:
        done = self.n_training_steps + 1
        if self.checkpoint_every and done % self.checkpoint_every == 0:
            self.n_training_steps += 1  # the state on disk is "after this step"
            try:
                self.save_checkpoint()
            finally:
                self.n_training_steps -= 1

    @torch.no_grad()
    def _update_pbar(self, step_output: Any, pbar: Any, update_interval: int = 100) -> None:
        pbar.update(self.cfg.train_batch_size_samples)
        if self.n_training_steps % self.log_every and self.n_training_steps != 1:
            return
        self.check_finite()
        x = step_output.sae_in.double()
        # sums over the global batch (all ranks), so the log is the same in any world size
        sums = torch.stack(
            [
                step_output.losses["mse_loss"].detach().double(),
                step_output.losses["auxiliary_reconstruction_loss"].detach().double(),
                (step_output.sae_out.double() - x).pow(2).sum(),
                (x - x.mean(0)).pow(2).sum(),
                (step_output.feature_acts > 0).sum().double() / x.shape[0],
            ]
        )
        mse, aux, sq_err, total_var, l0 = (all_reduce_sum_(sums) / dist_info().world_size).tolist()
        row = {
            "step": self.n_training_steps,
            "mse": mse,
            "aux": aux,
            "fve_batch": 1 - sq_err / total_var,
            "l0": l0,
            "dead": int(self.dead_neurons.sum()),
            "threshold": float(self.sae.threshold),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        self.history.append(row)
        pbar.set_postfix(
            mse=f"{row['mse']:.3g}",
            fve=f"{row['fve_batch']:.3f}",
            l0=f"{row['l0']:.0f}",
            dead=row["dead"],
            refresh=False,
        )


def _training_config(cfg: CrossCoderConfig, overrides: dict[str, Any]) -> TrainingCrossCoderConfig:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(cfg, TrainingCrossCoderConfig):
        fields = {k: v for k, v in asdict(cfg).items() if k != "metadata"}
        metadata = SAEMetadata(**cfg.metadata.to_dict())
        return TrainingCrossCoderConfig(**(fields | overrides), metadata=metadata)
    if not isinstance(cfg, CrossCoderConfig):
        raise CrossdiffError(f"cfg must be a CrossCoderConfig, got {type(cfg).__name__}")
    return TrainingCrossCoderConfig.from_inference_config(cfg, **overrides)


def train_crosscoder(
    acts: Any,
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
    prefetch: int = 2,
) -> CrossCoder:
    """Train a crosscoder on paired activations; return it ready for raw activations.

    acts: a tensor [n_tokens, n_models, d_model] (raw activations), an ActivationStore, or a
    LiveActivations (the models run while it trains; the same crosscoder as from the store).
    steps / total_tokens: training length (default 3000 steps). lr: default 2e-4 / sqrt(d_sae /
    2**14). Warm-up over lr_warmup_steps (default 5% of steps), linear decay to 0 over the last
    lr_decay_fraction of steps. k_anneal_*: BatchTopK k from k_anneal_start down to cfg.k over the
    first k_anneal_steps. dead_after_tokens: a latent that has not fired for this many tokens gets
    the auxiliary loss (default min(10M, total_tokens / 10)). normalize: scale a tensor's models
    to mean norm sqrt(d_model) while training, or sqrt(width) per model for cfg.d_models (a store
    always uses its own scaling factors).
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
    asynchronously on CUDA).
    Under torchrun, `batch_size` is the global batch; each of the N processes trains on
    batch_size / N rows of it and the result is the same crosscoder (see the module docstring).
    """
    if batch_size < 1:
        raise CrossdiffError(f"batch_size={batch_size} must be >= 1")
    if steps is None:
        steps = DEFAULT_STEPS if total_tokens is None else max(1, total_tokens // batch_size)
    if steps < 1:
        raise CrossdiffError(f"steps={steps} must be >= 1")
    if not 0 <= lr_decay_fraction < 1:
        raise CrossdiffError(f"lr_decay_fraction={lr_decay_fraction} must be in [0, 1)")
    tcfg = _training_config(
        cfg,
        {
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
    if tcfg.threshold_schedule == "ema" and tcfg.threshold_start_step >= steps - 1:
        raise CrossdiffError(
            f"threshold_schedule='ema' starts after step threshold_start_step="
            f"{tcfg.threshold_start_step}, but the run has only {steps} steps, so the inference "
            "threshold would never be set; lower threshold_start_step or train longer"
        )
    info = dist_info()
    dev = compute_device(device)
    if batch_size % info.world_size:
        raise CrossdiffError(
            f"batch_size={batch_size} does not split evenly over {info.world_size} processes; "
            "use a batch size divisible by the number of processes"
        )
    wandb = wandb and info.is_main
    if isinstance(acts, Tensor):
        source: Any = _TensorSource(acts, tcfg, batch_size)
    elif isinstance(acts, LiveActivations):
        source = _LiveSource(acts, tcfg, batch_size)
    else:
        source = _StoreSource(acts, tcfg, batch_size)
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

    seed_everything(seed)
    # weights, Adam moments and gradients: about 4 copies of encoder and decoder
    n_bytes = 4 * 2 * tcfg.d_sae * tcfg.d_in * torch.finfo(torch.float32).bits // 8
    with allocation_guard(f"a crosscoder with d_sae={tcfg.d_sae}, d_in={tcfg.d_in}", n_bytes):
        sae = TrainingCrossCoder(tcfg).to(dev)
    is_store = not isinstance(acts, Tensor)
    is_live = isinstance(acts, LiveActivations)
    scale = (
        source.raw_scaling_factors(seed) if (normalize or is_store) else torch.ones(tcfg.n_models)
    )
    sample = source.sample(_SAMPLE_TOKENS, seed + 1) * scale[:, None]
    if is_store:  # the sample sets the decoder bias: one NaN in it would spoil every step
        source.check_finite(sample, "the sample of activations that sets the decoder bias")
    with torch.no_grad():
        if tcfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(sample.to(dev)))
        else:
            sae.b_dec.copy_(sample.mean(0).to(dev))
    broadcast_module_(sae)  # every rank starts from rank 0's weights, whatever its RNG did
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
    trainer.data_provider = prefetch_to_device(batches, dev, depth=prefetch)

    if wandb:
        try:
            import wandb as wandb_lib
        except ImportError as err:
            raise CrossdiffError(
                "wandb=True (--wandb) logs to Weights & Biases, but wandb is not installed; "
                "install it with `pip install 'crossdiff[wandb]'` or leave logging off"
            ) from err

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
