"""The crosscoder's sparse selection arithmetic: the autograd function that keeps only the selected
pre-activations (and their sparse gradient), the selection scores, the code weights of the
decoder norms, and the mask of each model's own width."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.plumbing.common import CrossdiffError


class SelectedPreActivations(torch.autograd.Function):
    """Forward: the given values of pre = (x - b_dec) W + b_enc at (rows, latents).
    Backward: the gradient of those entries only, through a sparse [d_sae, batch] matrix."""

    @staticmethod
    def forward(ctx, values, x_centered, W_flat, b_enc, b_dec_flat, rows, latents, uses_b_dec):
        ctx.save_for_backward(x_centered, W_flat, rows, latents)
        ctx.uses_b_dec = uses_b_dec
        return values.to(
            W_flat.dtype, copy=True
        )  # float32 even when autocast computed `pre` in bfloat16

    @staticmethod
    def backward(ctx, grad):
        x_centered, W_flat, rows, latents = ctx.saved_tensors
        d_in, d_sae = W_flat.shape
        grad_t = torch.sparse_coo_tensor(
            torch.stack([latents, rows]),
            grad,
            (d_sae, x_centered.shape[0]),
            check_invariants=False,
        )
        grad_W = torch.sparse.mm(grad_t, x_centered).t()
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
        grad_b_enc.index_add_(0, latents, grad)
        grad_b_dec = -(W_flat @ grad_b_enc) if ctx.uses_b_dec else None
        return None, None, grad_W, grad_b_enc, grad_b_dec, None, None, None


def selection_scores(
    pre: Float[Tensor, "batch d_sae"], weights: Float[Tensor, " d_sae"]
) -> Float[Tensor, " batch_x_d_sae"]:
    """ReLU(pre) * weights, flattened, in one new tensor: the weights are >= 0, so this is
    ReLU(pre * weights), value for value."""
    return torch.mul(pre, weights).clamp_min_(0).flatten()


def code_weights(
    norms: Float[Tensor, "d_sae n_models"], normalization: str = "sum", alpha: float = 0.7
) -> Float[Tensor, " d_sae"]:
    """A latent's code weight from its per-model decoder norms n_m: "sum" = sum_m n_m,
    "concat" = sqrt(sum_m n_m^2) (the norm of the concatenated decoder), "mixed" =
    alpha * concat + (1 - alpha) * sum."""
    if normalization == "sum":
        return norms.sum(-1)
    concat = norms.pow(2).sum(-1).sqrt()
    if normalization == "concat":
        return concat
    if normalization == "mixed":
        return alpha * concat + (1 - alpha) * norms.sum(-1)
    raise CrossdiffError(
        f"code_normalization={normalization!r}; expected one of ('sum', 'concat', 'mixed')"
    )


def width_mask(
    widths: tuple[int, ...], d_model: int, **kw: Any
) -> Float[Tensor, "n_models d_model"]:
    """1 on each model's own coordinates [0, width_m), 0 on its padding up to d_model."""
    mask = torch.zeros(len(widths), d_model, **kw)
    for m, width in enumerate(widths):
        mask[m, :width] = 1
    return mask
