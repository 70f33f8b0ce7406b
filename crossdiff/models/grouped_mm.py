"""The MoE experts as three grouped matmuls (`torch.nn.functional.grouped_mm`), for CUDA in
bfloat16: one kernel per weight kind for all experts, where the per-expert path launches three
per expert. crossdiff.models.moe dispatches to it when `grouped_mm_usable` says so and keeps its
other paths (float32 `_GroupedSwiGLU`, the expert modules) for everything else.

Constraints of the kernel (torch 2.13's docstring): bfloat16 operands, CUDA compute capability
8.0 or newer, and 16-byte aligned rows (d_model and d_mlp multiples of 8 in bfloat16). The
backward is torch's own. The CPU implementation exists too (slow); tests use it to check this
function's ordering and offsets against the expert modules.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_failed: list[str] = []  # the first kernel error seen on this process; the fallback is used after


def grouped_mm_usable(x: Tensor, weights_dtype: torch.dtype, d_model: int, d_mlp: int) -> bool:
    """Whether the grouped kernel applies: CUDA (capability >= 8.0), bfloat16 compute (bfloat16
    autocast or bfloat16 weights), aligned widths, and no earlier failure of the kernel here."""
    if _grouped_mm is None or _failed or not x.is_cuda:
        return False
    autocast_bf16 = (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    )
    if not (autocast_bf16 or weights_dtype == torch.bfloat16):
        return False
    if d_model % 8 or d_mlp % 8:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def grouped_swiglu(
    x: Float[Tensor, "tokens d_model"],
    order: Int[Tensor, " slots"],
    counts: Int[Tensor, " experts"],
    top_k: int,
    w_gate: Float[Tensor, "experts d_mlp d_model"],
    w_in: Float[Tensor, "experts d_mlp d_model"],
    w_out: Float[Tensor, "experts d_model d_mlp"],
) -> Float[Tensor, "slots d_model"]:
    """SiLU(x W_gate^T) * (x W_in^T) W_out^T of each slot's expert, in bfloat16, in slot order
    (slot s is token s // top_k; `order` sorts the slots by expert, `counts` per expert)."""
    dtype = torch.bfloat16
    x_sorted = x.index_select(0, order // top_k).to(dtype)
    offs = counts.cumsum(0).to(torch.int32)
    gate = _grouped_mm(x_sorted, w_gate.to(dtype).transpose(-2, -1), offs=offs)
    up = _grouped_mm(x_sorted, w_in.to(dtype).transpose(-2, -1), offs=offs)
    y_sorted = _grouped_mm(F.silu(gate) * up, w_out.to(dtype).transpose(-2, -1), offs=offs)
    slot_to_sorted = torch.empty_like(order)
    slot_to_sorted[order] = torch.arange(len(order), device=order.device)
    return y_sorted.index_select(0, slot_to_sorted)


def try_grouped_swiglu(*args: Tensor | int) -> Tensor | None:
    """grouped_swiglu, or None (with one warning per process) when the kernel refuses this GPU
    or shape: the caller then uses its per-expert path."""
    try:
        return grouped_swiglu(*args)
    except (RuntimeError, NotImplementedError) as err:
        _failed.append(str(err))
        warnings.warn(
            f"torch's grouped_mm failed ({str(err)[:200]}); the MoE experts run one by one "
            "from now on in this process",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
