"""Reconstruction with BatchTopK at the training k, measured beside the diff pass's threshold
encoding, to report both L0s and both FVEs (and warn when they disagree).

The pre-activations that `cc.encode` computes are caught at the crosscoder's
`hook_sae_acts_pre` hook point and reused, so BatchTopK costs a selection, not a second encoder
matmul; a crosscoder without that hook or `select_batch_topk` gets `cc.encode_topk(x)` instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn


class TopKMeter:
    """Use as a context manager around the pass (it removes its hook on exit); call `update`
    once per batch after `cc.encode(x)`. Disabled (all results None) without `encode_topk`."""

    def __init__(self, cc: Any, n_models: int, device: torch.device):
        self.cc = cc
        self.enabled = callable(getattr(cc, "encode_topk", None))
        self.k = float(getattr(getattr(cc, "cfg", None), "k", 0) or 0)
        self.l0_sum = 0.0
        self.sse = torch.zeros(n_models, dtype=torch.float64, device=device)
        self._pre: Tensor | None = None
        self._hook = getattr(cc, "hook_sae_acts_pre", None)
        self._reuse = (
            self.enabled
            and self.k > 0
            and isinstance(self._hook, nn.Module)
            and callable(getattr(cc, "select_batch_topk", None))
        )
        self._handle: Any = None

    def __enter__(self) -> TopKMeter:
        if self._reuse:
            self._handle = self._hook.register_forward_hook(self._catch)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _catch(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._pre = output

    def update(
        self,
        x: Float[Tensor, "batch n_models d_model"],
        decode: Any,
    ) -> None:
        """decode(rows, cols, vals, batch) -> x_hat: the pass's decoder (sparse or cc.decode)."""
        if not self.enabled:
            return
        pre, self._pre = self._pre, None
        if pre is not None and pre.shape[0] == x.shape[0]:
            # the same selection as cc.encode_topk, on the pre-activations encode computed
            flat, _ = self.cc.select_batch_topk(pre, self.k)
            d_sae = pre.shape[1]
            rows, cols = flat // d_sae, flat % d_sae
            vals = pre.flatten()[flat].relu()
        else:
            f = self.cc.encode_topk(x)
            rows, cols = torch.nonzero(f, as_tuple=True)
            vals = f[rows, cols]
        active = vals > 0
        rows, cols, vals = rows[active], cols[active], vals[active]
        x_hat = decode(rows, cols, vals, x.shape[0])
        self.l0_sum += float(len(vals))
        self.sse += ((x - x_hat).double() ** 2).sum(dim=(0, 2))

    def results(self) -> tuple[float | None, np.ndarray | None]:
        """(sum of active latents over tokens, SSE per model), or (None, None) when disabled."""
        if not self.enabled:
            return None, None
        return self.l0_sum, self.sse.cpu().numpy()
