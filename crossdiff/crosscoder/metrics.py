"""Reconstruction metrics with the right formula, accumulated over the whole evaluation set.

FVE_m = 1 - sum_t ||x_tm - x_hat_tm||^2 / sum_t ||x_tm - mean_m||^2, per model m; overall FVE
pools both sums over models. Not averaged per token, not variance about zero.

Pooled in raw units, the model with the larger activations dominates the overall FVE, so it is
also given in each model's normalized units: fve_pooled_normalized = 1 - sum_m SSE_m s_m^2 /
sum_m SST_m s_m^2, with s_m the factor that brings model m's mean norm to sqrt(d_m), its own
width (the store's scaling factors, estimated on its training part). Models of different widths
are padded to the widest; every sum here covers only each model's own width.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from crossdiff.activations.source import ActivationSource, check_activations
from crossdiff.activations.store import evaluation_part
from crossdiff.crosscoder.fve import ReconstructionMeter
from crossdiff.crosscoder.spliced_loss import spliced_loss_on
from crossdiff.plumbing.api_checks import check_crosscoder
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.integrity import check_finite_module


def _eval_batches(
    acts_or_store: Any, n_models: int, d_model: int, batch_size: int, max_tokens: int | None
) -> Iterator[Tensor]:
    if isinstance(acts_or_store, Tensor):
        acts = acts_or_store
        if acts.ndim != 3 or tuple(acts.shape[1:]) != (n_models, d_model):
            raise CrossdiffError(
                f"activations have shape {tuple(acts.shape)}; expected "
                f"[n_tokens, n_models={n_models}, d_model={d_model}]"
            )
        stop = acts.shape[0] if max_tokens is None else min(max_tokens, acts.shape[0])
        for start in range(0, stop, batch_size):
            yield acts[start : min(start + batch_size, stop)]
        return
    seen = 0
    batch_size = min(batch_size, acts_or_store.n_tokens)
    for batch in acts_or_store.iter_batches(
        batch_size, seed=0, shuffle=True, normalize=False, loop=False
    ):
        if max_tokens is not None and seen + batch.shape[0] > max_tokens:
            batch = batch[: max_tokens - seen]
        if batch.shape[0] == 0:
            break
        seen += batch.shape[0]
        yield batch
        if max_tokens is not None and seen >= max_tokens:
            break


def check_finite(batch: Tensor, where: str) -> None:
    bad = ~torch.isfinite(batch)
    if bool(bad.any()):
        token, model, dim = (int(i) for i in bad.nonzero()[0])
        raise CrossdiffError(
            f"non-finite activation (value {batch[token, model, dim].item()}) in {where}: "
            f"token {token}, model {model}, dimension {dim}; re-harvest or drop those tokens"
        )


def check_zero_padding(acts: Tensor, cfg: Any) -> None:
    """Models narrower than d_model must be padded with zeros (the crosscoder never reads or
    writes those coordinates, and a non-zero one would count as unexplainable error)."""
    if acts.ndim != 3 or tuple(acts.shape[1:]) != (len(cfg.widths), cfg.d_model):
        return  # a shape error, reported with the shape by the caller's own check
    for m, width in enumerate(cfg.widths):
        if width < cfg.d_model and bool(acts[:, m, width:].ne(0).any()):
            raise CrossdiffError(
                f"model {m} has width {width} (d_models={list(cfg.widths)}) but its activations "
                f"have non-zero values in columns {width}..{cfg.d_model - 1}; put its activation "
                f"in acts[:, {m}, :{width}] and leave the rest zero"
            )


@torch.no_grad()
def evaluate_crosscoder(
    cc: Any,
    acts_or_store: Tensor | ActivationSource,
    *,
    batch_size: int = 4096,
    max_tokens: int | None = None,
    models: Sequence[Any] | None = None,
    tokens: Any = None,
    pairing: Any = None,
    model_names: Sequence[str] | None = None,
    splice_sequences: int | None = 64,
    part: str | None = None,
    allow_mismatch: bool = False,
) -> dict[str, Any]:
    """Evaluate a crosscoder on raw activations (a tensor [N, n_models, d] or a store).

    Returns fve, fve_per_model, fve_pooled_normalized, mse_per_model, l0 and dead_fraction with
    the inference threshold; fve_topk, fve_topk_per_model and l0_topk with BatchTopK on each
    evaluation batch (L0 = k); n_tokens; evaluated_on: which tokens ('heldout', 'train', 'all'
    of a store, or 'given' for a tensor) and scaling_factors (the s_m of fve_pooled_normalized).
    A store is evaluated on its held-out part by default (its training part, with a warning,
    when it has none; `part` chooses), read raw (not normalized), shuffled, up to `max_tokens`;
    a tensor is read in order, its first `max_tokens` rows.

    Given `models` (in harvest order) and `tokens` (held-out rows), also "spliced_loss": each
    model's LM loss with its paired activations replaced by the reconstruction, on the first
    `splice_sequences` rows (crossdiff.crosscoder.spliced_loss; `pairing` and `model_names`
    default to the store's).

    A store other than the one `cc` was trained on (other models, hooks or tokens, by its
    cfg.json) is refused unless `allow_mismatch`; the differences are then under "mismatch".
    """
    check_crosscoder(cc, "evaluate_crosscoder")
    check_activations(acts_or_store, "evaluate_crosscoder", "acts_or_store")
    from crossdiff.crosscoder.compatibility import check_reads

    mismatch = check_reads(
        cc, acts_or_store, allow_mismatch=allow_mismatch, where="evaluate_crosscoder"
    )
    acts_or_store, evaluated_on = evaluation_part(acts_or_store, part)
    scaling_factors = normalized_unit_factors(cc, acts_or_store)
    cfg = cc.cfg
    if isinstance(cc, torch.nn.Module):
        check_finite_module(cc, "the crosscoder", "load or train an undamaged one")
    was_training = cc.training
    cc.eval()
    widths = getattr(cfg, "widths", None)
    threshold_meter = ReconstructionMeter(cfg.n_models, cfg.d_model, widths)
    topk_meter = ReconstructionMeter(cfg.n_models, cfg.d_model, widths)
    active_total = 0
    topk_active_total = 0
    fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
    device = cc.W_enc.device
    if isinstance(acts_or_store, Tensor) and getattr(cfg, "padded", False):
        check_zero_padding(acts_or_store, cfg)
    for i, batch in enumerate(
        _eval_batches(acts_or_store, cfg.n_models, cfg.d_model, batch_size, max_tokens)
    ):
        batch = batch.to(device, cc.dtype)
        check_finite(batch, f"evaluation batch {i}")
        f = cc.encode_threshold(batch)
        threshold_meter.update(batch, cc.decode_dense(f))
        active = f > 0
        active_total += int(active.sum())
        fired |= active.any(0).cpu()
        f_topk = cc.encode_topk(batch)
        topk_meter.update(batch, cc.decode_dense(f_topk))
        topk_active_total += int((f_topk > 0).sum())
    cc.train(was_training)
    n = threshold_meter.n_tokens
    if n == 0:
        raise CrossdiffError("no activations to evaluate on (empty tensor or store)")
    result = {
        "fve": threshold_meter.fve(),
        "fve_per_model": threshold_meter.fve_per_model(),
        "fve_pooled_normalized": threshold_meter.fve_pooled_normalized(scaling_factors),
        "mse_per_model": threshold_meter.mse_per_model(),
        "l0": active_total / n,
        "dead_fraction": float(1 - fired.float().mean()),
        "fve_topk": topk_meter.fve(),
        "fve_topk_per_model": topk_meter.fve_per_model(),
        "l0_topk": topk_active_total / n,
        "n_tokens": n,
        "evaluated_on": evaluated_on,
        "scaling_factors": (
            scaling_factors if scaling_factors is not None else threshold_meter.scaling_factors()
        ).tolist(),
    }
    if models is not None:
        result["spliced_loss"] = spliced_loss_on(
            cc, acts_or_store, models, tokens, pairing=pairing, model_names=model_names,
            max_sequences=splice_sequences,
        )  # fmt: skip
    if mismatch:
        result["mismatch"] = mismatch
    return result


def normalized_unit_factors(cc: Any, acts_or_store: Any) -> Tensor | None:
    """Each model's factor to normalized units: the store's (estimated on its training part),
    else the one the crosscoder was trained with, else None (estimated from the evaluated data)."""
    factors = getattr(acts_or_store, "scaling_factors", None)
    if factors is None:
        training = getattr(getattr(cc.cfg, "metadata", None), "crossdiff_training", None)
        factors = (training or {}).get("scaling_factors")
    if factors is None:
        return None
    factors = torch.as_tensor(factors, dtype=torch.float64).flatten()
    return factors if factors.numel() == cc.cfg.n_models else None
