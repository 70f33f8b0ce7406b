"""The streaming pass: one read of the tokens accumulates every per-latent statistic.

Memory is bounded by the batch and by [d_sae, ...] accumulators; nothing per token is kept
except the top activations of each latent (for contexts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from crossdiff.analysis.experts import ExpertAccumulator, ExpertCounts
from crossdiff.analysis.latent_scaling import ScalingAccumulator, ScalingSums
from crossdiff.analysis.source import TokenSource
from crossdiff.analysis.topk_meter import TopKMeter
from crossdiff.crosscoder.fve import ReconstructionMeter
from crossdiff.plumbing.integrity import check_finite_acts, check_finite_module


@dataclass
class PassStats:
    """Everything the pass accumulated (numpy, float64 where sums)."""

    n_tokens: int
    fire_count: np.ndarray  # [d_sae]
    act_sum: np.ndarray  # [d_sae]
    act_sq_sum: np.ndarray  # [d_sae]
    l0_sum: float
    sse: np.ndarray  # [n_models]
    sst: np.ndarray  # [n_models]
    domain_mass: np.ndarray | None  # [d_sae, n_domains]
    domain_tokens: np.ndarray | None  # [n_domains]
    expert_counts: np.ndarray | None  # [d_sae, n_pairs]: (layer, expert) pairs, layer-major
    expert_tokens: np.ndarray | None  # [n_pairs]
    experts: ExpertCounts | None  # the same counts per layer, with the layout
    top_values: np.ndarray  # [d_sae, n_top], descending; 0 where fewer firings
    top_indices: np.ndarray  # [d_sae, n_top], store index; -1 where none
    scaling_latents: np.ndarray  # [n_spec] latent ids with latent-scaling sums
    scaling: ScalingSums | None  # sums over each of those latents' firing tokens
    sparse_decode: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # BatchTopK at the training k on each batch (None when cc has no encode_topk)
    l0_topk_sum: float | None = None
    sse_topk: np.ndarray | None = None  # [n_models]


def _module_device_dtype(cc: Any) -> tuple[torch.device, torch.dtype]:
    w = cc.W_dec
    return w.device, w.dtype if w.dtype.is_floating_point else torch.float32


def _sparse_decoder(cc: Any) -> Any:
    """The crosscoder's own sparse decode from active entries (rows sorted, as torch.nonzero
    returns them), or None for a crosscoder without one (it decodes densely)."""
    decode_sparse = getattr(cc, "decode_sparse", None)
    if decode_sparse is None:
        return None
    d_sae = int(cc.W_dec.shape[0])

    def decode(rows: Tensor, cols: Tensor, vals: Tensor, batch: int) -> Tensor:
        return decode_sparse(rows * d_sae + cols, vals, batch)

    return decode


def run_pass(
    cc: Any,
    source: TokenSource,
    ranges: list[tuple[int, int]],
    *,
    batch_size: int,
    n_top: int,
    scaling_latents: np.ndarray,
    show_progress: bool = True,
    expert_layout: list[Any] | None = None,
) -> PassStats:
    device, dtype = _module_device_dtype(cc)
    if isinstance(cc, torch.nn.Module):
        check_finite_module(cc, "the crosscoder", "load or train an undamaged one")
    store = source.store if hasattr(source.store, "manifest") else None  # to name shard and row
    d_sae = int(cc.W_dec.shape[0])
    n_models, d_model = int(cc.W_dec.shape[1]), int(cc.W_dec.shape[2])
    n_domains = len(source.domain_names)
    has_domains = "domains" in source.metadata_keys and n_domains > 0
    has_experts = "experts" in source.metadata_keys

    f64 = dict(dtype=torch.float64, device=device)
    fire_count = torch.zeros(d_sae, dtype=torch.int64, device=device)
    act_sum = torch.zeros(d_sae, **f64)
    act_sq_sum = torch.zeros(d_sae, **f64)
    l0_sum = 0.0
    reconstruction = ReconstructionMeter(n_models, d_model, device=device)
    domain_mass = torch.zeros(d_sae, n_domains, **f64)
    domain_tokens = torch.zeros(n_domains, **f64)
    expert_acc = ExpertAccumulator(expert_layout, source.manifest, d_sae, device)
    top_values = torch.zeros(n_top, d_sae, dtype=dtype, device=device)
    top_indices = torch.full((n_top, d_sae), -1, dtype=torch.int64, device=device)
    scaling = ScalingAccumulator(scaling_latents, d_sae, n_models, d_model, device)
    sparse_decode = _sparse_decoder(cc)
    # decided on the first batch by comparing with cc.decode
    use_sparse: bool | None = None if sparse_decode is not None else False
    topk = TopKMeter(cc, n_models, device)

    def decode_entries(rows: Tensor, cols: Tensor, vals: Tensor, batch: int) -> Tensor:
        if use_sparse:
            return sparse_decode(rows, cols, vals, batch)
        dense = torch.zeros(batch, d_sae, dtype=vals.dtype, device=device)
        dense[rows, cols] = vals
        return cc.decode(dense)

    total = sum(stop - start for start, stop in ranges)
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="diff pass", disable=not show_progress
    )
    with torch.no_grad(), topk:
        for range_start, range_stop in ranges:
            for start in range(range_start, range_stop, batch_size):
                stop = min(start + batch_size, range_stop)
                x = source.read_acts(start, stop).to(device=device, dtype=dtype)
                check_finite_acts(x, "the diff pass", store=store, first_token=start)
                f = cc.encode(x)
                # everything below works on the active entries only (about L0 per token)
                rows, cols = torch.nonzero(f, as_tuple=True)
                vals = f[rows, cols]
                if use_sparse is None:  # use the sparse path only if it matches cc.decode
                    x_hat = cc.decode(f)
                    tol = 1e-4 * max(float(x_hat.abs().max()), 1.0)
                    try:
                        mine = sparse_decode(rows, cols, vals, len(f))
                        use_sparse = bool(torch.allclose(mine, x_hat, rtol=1e-4, atol=tol))
                    except RuntimeError:
                        use_sparse = False
                elif use_sparse:
                    x_hat = sparse_decode(rows, cols, vals, len(f))
                else:
                    x_hat = cc.decode(f)
                v64 = vals.double()
                fire_count += torch.bincount(cols, minlength=d_sae)
                act_sum += torch.bincount(cols, weights=v64, minlength=d_sae)
                act_sq_sum += torch.bincount(cols, weights=v64 * v64, minlength=d_sae)
                l0_sum += float(len(vals))
                reconstruction.update(x, x_hat)

                # top activations: only latents whose batch maximum beats their current n-th best
                batch_max = f.max(dim=0).values
                cand = torch.nonzero(batch_max > top_values[-1], as_tuple=True)[0]
                if len(cand):
                    k = min(n_top, stop - start)
                    vals_c, idx_c = f[:, cand].topk(k, dim=0)
                    all_vals = torch.cat([top_values[:, cand], vals_c])
                    all_idx = torch.cat([top_indices[:, cand], idx_c + start])
                    best, pick = all_vals.topk(n_top, dim=0)
                    top_values[:, cand] = best
                    top_indices[:, cand] = all_idx.gather(0, pick)

                if has_domains or has_experts:
                    meta = source.read_metadata(start, stop)
                if has_domains:  # -1 (a token of no domain) counts in no domain's share
                    dom = meta["domains"].to(device=device, dtype=torch.int64)
                    known = (dom >= 0) & (dom < n_domains)
                    entry = known[rows]
                    flat = cols[entry] * n_domains + dom[rows[entry]]
                    domain_mass += torch.bincount(
                        flat, weights=v64[entry], minlength=d_sae * n_domains
                    ).view(d_sae, n_domains)
                    domain_tokens += torch.bincount(dom[known], minlength=n_domains).double()
                if has_experts:
                    experts = meta["experts"].to(device=device, dtype=torch.int64)
                    if experts.ndim == 1:
                        experts = experts[:, None]
                    expert_acc.update(experts, rows, cols)
                scaling.update(rows, cols, vals, x, x_hat)
                topk.update(x, decode_entries)  # BatchTopK at k, beside the threshold
                bar.update(stop - start)
    bar.close()

    sst = reconstruction.total_variance()
    has_domains = has_domains and float(domain_tokens.sum()) > 0  # else no token had a domain
    order = top_values.T.float().cpu().numpy()  # numpy has no bfloat16
    top_idx = top_indices.T.cpu().numpy()
    top_idx[order <= 0] = -1
    experts = expert_acc.result() if has_experts else None
    l0_topk_sum, sse_topk = topk.results()
    return PassStats(
        n_tokens=total,
        fire_count=fire_count.cpu().numpy(),
        act_sum=act_sum.cpu().numpy(),
        act_sq_sum=act_sq_sum.cpu().numpy(),
        l0_sum=l0_sum,
        sse=reconstruction.sq_error.cpu().numpy(),
        sst=sst.cpu().numpy(),
        domain_mass=domain_mass.cpu().numpy() if has_domains else None,
        domain_tokens=domain_tokens.cpu().numpy() if has_domains else None,
        expert_counts=experts.flat_counts if experts is not None else None,
        expert_tokens=experts.flat_tokens if experts is not None else None,
        experts=experts,
        top_values=np.maximum(order, 0.0).astype(np.float64),
        top_indices=top_idx,
        scaling_latents=np.asarray(scaling_latents, dtype=np.int64),
        scaling=scaling.result(),
        sparse_decode=bool(use_sparse),
        l0_topk_sum=l0_topk_sum,
        sse_topk=sse_topk,
    )
