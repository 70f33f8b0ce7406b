"""Where training batches come from: activations in memory, an ActivationStore, or live models.

Each source checks its activations against the crosscoder's config, gives a raw sample (for the
scaling factors and the decoder bias) and a seeded stream of scaled float32 batches on the CPU,
this rank's slice of each global batch, starting at any step (so a resumed run sees the batches an
uninterrupted one would).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.activations.live import LiveActivations
from crossdiff.activations.source import ActivationSource
from crossdiff.activations.store import training_part
from crossdiff.crosscoder.config import CrossCoderConfig
from crossdiff.crosscoder.metrics import check_finite, check_zero_padding
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import DistInfo, shard_rows
from crossdiff.plumbing.integrity import locate_nonfinite_in_store

SAMPLE_TOKENS = 65536  # tokens used to estimate scaling factors and the initial decoder bias
GEOMETRIC_MEDIAN_MAX_ITER = 100
GEOMETRIC_MEDIAN_TOL = 1e-5


# hand-written: no installed library has a batched torch geometric median (the PyPI
# `geom_median` would be a dependency for these twelve lines of Weiszfeld's iteration)
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
        sample = self.sample(SAMPLE_TOKENS, seed)
        # float64: the squares of activations near 1e20 overflow float32 (a factor of 0)
        mean_norm = sample.double().norm(dim=-1).mean(0)
        if bool((mean_norm == 0).any()):
            raise CrossdiffError("a model's activations are all zero; check the harvest")
        if self.widths is not None:  # each model to mean norm sqrt(its own width)
            target = torch.tensor(self.widths, dtype=torch.float64).sqrt()
        else:
            target = torch.full_like(mean_norm, sample.shape[-1] ** 0.5)
        return (target / mean_norm).float()

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
    """An ActivationSource (a store, its training part): scaled [batch, n_models, d] batches."""

    def __init__(self, store: ActivationSource, cfg: CrossCoderConfig, batch_size: int):
        store = training_part(store)  # never the held-out part
        widths = tuple(store.d_models)
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
        # `scale` is the store's own factors (normalize=True) or ones (raw activations). A resumed
        # run replays the same seeded stream and discards the batches it has already trained on,
        # so it sees exactly the batches an uninterrupted run sees; that costs re-reading them
        # (disk reads only, no compute).
        raw = bool((scale == 1).all())
        it = self.store.iter_batches(
            batch_size, seed=seed, shuffle=True, normalize=not raw, loop=True, dtype=torch.float32
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


def training_source(acts: Tensor | ActivationSource, cfg: CrossCoderConfig, batch_size: int) -> Any:
    """The source for `acts`: a tensor, a LiveActivations, or another ActivationSource."""
    if isinstance(acts, Tensor):
        return _TensorSource(acts, cfg, batch_size)
    if isinstance(acts, LiveActivations):
        return _LiveSource(acts, cfg, batch_size)
    return _StoreSource(acts, cfg, batch_size)
