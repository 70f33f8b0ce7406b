"""The masks that keep a crosscoder's forbidden weights at exactly zero: the padding beyond a
narrower model's width (cfg.d_models) and, in a Dedicated Feature Crosscoder, every weight a model
has on another model's exclusive latent (cfg.partition). Zero at initialization, their gradients
masked (so no optimizer moves them), and checked on save and load. A mixin of CrossCoderWeights
(model.py)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from crossdiff.crosscoder.partition import partition_mask
from crossdiff.crosscoder.sparse import width_mask
from crossdiff.plumbing.common import CrossdiffError


class WeightMasks:
    cfg: Any
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    W_dec_untied: nn.Parameter
    W_dec: Tensor

    def latent_mask(self, like: Tensor) -> Float[Tensor, "d_sae n_models"]:
        """A DFC's partition: 1 where model m reads and writes latent i (all ones otherwise)."""
        cfg = self.cfg
        return partition_mask(
            cfg.partition, cfg.d_sae, cfg.n_models, device=like.device, dtype=like.dtype
        )

    def width_mask(self, like: Tensor) -> Float[Tensor, "n_models d_model"]:
        """1 on each model's own coordinates, 0 on its padding (built from cfg, on `like`'s
        device and dtype: no buffer, so the state dict is that of an equal-width crosscoder)."""
        return width_mask(self.cfg.widths, self.cfg.d_model, device=like.device, dtype=like.dtype)

    def _mask_padding_gradients(self) -> None:
        """Zero the gradient of every padded coordinate and (a DFC) of every weight a model has
        on another model's exclusive latent, so no optimizer ever moves it."""
        self.W_enc.register_hook(lambda g: g * self._enc_mask(g))
        self.W_dec_untied.register_hook(lambda g: g * self._dec_mask(g))
        self.b_dec.register_hook(lambda g: g * self.width_mask(g))

    def _enc_mask(self, g: Tensor) -> Tensor:  # [n_models, d_model, d_sae]
        mask = self.width_mask(g)[:, :, None]
        return mask * self.latent_mask(g).T[:, None, :] if self.cfg.dfc else mask

    def _dec_mask(self, g: Tensor) -> Tensor:  # [d_sae - n_tied, n_models, d_model]
        mask = self.width_mask(g)[None]
        if self.cfg.dfc:
            mask = mask * self.latent_mask(g)[self.cfg.n_tied :, :, None]
        return mask

    @torch.no_grad()
    def padding_max_abs(self) -> float:
        """The largest |value| in the padded coordinates of W_enc, W_dec and b_dec (0 when the
        models have equal widths); it is exactly 0 for a sound crosscoder."""
        if not self.cfg.padded:
            return 0.0
        pad = self.width_mask(self.b_dec) == 0
        return max(
            float(self.W_enc.detach().permute(2, 0, 1)[:, pad].abs().max()),
            float(self.W_dec.detach()[:, pad].abs().max()),
            float(self.b_dec.detach()[pad].abs().max()),
        )

    @torch.no_grad()
    def partition_max_abs(self) -> float:
        """A DFC: the largest |value| of a model's encoder or decoder weights on another model's
        exclusive latent (0 for a standard crosscoder); exactly 0 for a sound DFC."""
        if not self.cfg.dfc:
            return 0.0
        forbidden = self.latent_mask(self.b_enc) == 0  # [d_sae, n_models]
        enc = self.W_enc.detach().permute(2, 0, 1)[forbidden]
        dec = self.W_dec.detach()[forbidden]
        return max(float(enc.abs().max()), float(dec.abs().max()))

    def check_padding(self, where: str, advice: str) -> None:
        """Refuse weights whose padded coordinates (beyond a model's width) are not zero, and a
        DFC whose models have weights on each other's exclusive latents."""
        worst = self.partition_max_abs()
        if worst != 0:
            raise CrossdiffError(
                f"{where} is a Dedicated Feature Crosscoder (partition={list(self.cfg.partition)})"
                f" with non-zero weights (largest |value| {worst:.3g}) of a model on another "
                f"model's exclusive latents; those must be exactly zero. {advice}"
            )
        worst = self.padding_max_abs()
        if worst != 0:
            raise CrossdiffError(
                f"{where} has non-zero weights (largest |value| {worst:.3g}) beyond a model's "
                f"width (d_models={list(self.cfg.widths)}, padded to {self.cfg.d_model}); "
                f"those coordinates must be exactly zero. {advice}"
            )
