"""The settings of a language-model run and one optimizer step under them.

Batch `s` is the same rows for the dense and the MoE model (a seeded permutation per epoch);
AdamW with linear warm-up and cosine decay; gradient clipping. crossdiff.models.train runs the
loop that calls `train_step`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from transformer_lens import HookedTransformer

from crossdiff.models.moe import DEFAULT_LOAD_BALANCE_COEF, DEFAULT_Z_LOSS_COEF, moe_aux_loss
from crossdiff.plumbing.common import refuse_float16_training
from crossdiff.plumbing.distributed import all_reduce_sum_, dist_info


@dataclass
class TrainOptions:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    seed: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    eval_every: int = 200
    checkpoint_every: int = 100
    eval_rows: int = 64  # held-out rows per domain in the final evaluation
    load_balance_coef: float = DEFAULT_LOAD_BALANCE_COEF
    z_loss_coef: float = DEFAULT_Z_LOSS_COEF
    autocast: bool = False  # bfloat16 autocast of the forward (fp32 weights, AdamW and loss)
    # the weights' initialization seed; None: `seed`, which also orders the batches. A control
    # model (crossdiff run --controls) differs from its twin only by this.
    init_seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out = json.loads(json.dumps(self.__dict__))
        if out["init_seed"] is None:  # a model trained before init_seed keeps its settings
            del out["init_seed"]
        return out


def batch_rows(step: int, batch_size: int, n_rows: int, seed: int) -> Tensor:
    """Row indices of batch `step`: consecutive slices of one seeded permutation per epoch."""
    start = step * batch_size
    epochs = range(start // n_rows, (start + batch_size - 1) // n_rows + 1)
    perm = torch.cat([_epoch_permutation(n_rows, seed, epoch) for epoch in epochs])
    offset = start - epochs[0] * n_rows
    return perm[offset : offset + batch_size]


def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def learning_rate(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms or biases), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params[:1]:  # a model's parameters share one dtype
        refuse_float16_training(p.dtype, "a language model", "dtype")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": opts.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95))


def train_step(
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
    tokens: Int[Tensor, "batch pos"],
    lr: float,
    grad_clip: float,
    *,
    ddp: DistributedDataParallel | None = None,
    autocast: bool = False,
) -> tuple[float, float]:
    """One optimizer step; returns (cross-entropy, aux loss), averaged over ranks under DDP.

    `ddp` is the DistributedDataParallel wrapping `model` in a torchrun job: the forward goes
    through it so that backward all-reduces the gradients before they are clipped."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        cross_entropy = (ddp or model)(tokens, return_type="loss").float()
        aux = moe_aux_loss(model).to(cross_entropy.device).float()
    (cross_entropy + aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses = torch.stack([cross_entropy.detach(), aux.detach()]).float()
    if ddp is not None:
        losses = all_reduce_sum_(losses) / dist_info().world_size
    ce, aux_value = losses.tolist()
    return ce, aux_value
