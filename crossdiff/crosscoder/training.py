"""The training crosscoder: a SAELens `TrainingSAE` that SAELens's `SAETrainer` drives.

One training step: pre-activations (dense encoder), BatchTopK selection on decoder-norm-weighted
scores, sparse decoding of the k * batch selected latents, MSE summed over models and width, the
auxiliary top-k loss on dead latents (its coefficient applied here, once: the trainer only sums),
and the moving-average update of the inference threshold.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from torch import Tensor

from crossdiff.crosscoder.config import TrainingCrossCoderConfig
from crossdiff.crosscoder.model import CrossCoder, CrossCoderWeights


class TrainingCrossCoder(CrossCoderWeights, TrainingSAE[TrainingCrossCoderConfig]):
    """Training crosscoder. `encode` here is BatchTopK over the given batch (the training rule)."""

    def __init__(self, cfg: TrainingCrossCoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def get_coefficients(self) -> dict[str, Any]:
        return {}

    def encode_with_hidden_pre(
        self, x: Float[Tensor, "batch n_models d_model"]
    ) -> tuple[Float[Tensor, "batch d_sae"], Float[Tensor, "batch d_sae"]]:
        pre = self.pre_activations(x)
        flat, _ = self.select_batch_topk(pre, float(self.cfg.k))
        acts = torch.zeros_like(pre).flatten()
        acts[flat] = pre.flatten()[flat].relu()
        return self.hook_sae_acts_post(acts.view_as(pre)), pre

    def decode(
        self, feature_acts: Float[Tensor, "batch d_sae"]
    ) -> Float[Tensor, "batch n_models d_model"]:
        return self.decode_dense(feature_acts)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x = step_input.sae_in
        batch = x.shape[0]
        k = self.cfg.k_at_step(step_input.n_training_steps)
        with torch.no_grad():  # dense pre-activations only to choose; gradients go sparse
            pre = self.pre_activations(x)
        flat, scores = self.select_batch_topk(pre, k)
        rows, latents = flat // self.cfg.d_sae, flat % self.cfg.d_sae
        values = self.selected_pre_activations(pre, x, rows, latents).relu()
        recon = self.decode_sparse(flat, values, batch)
        mse = (recon - x).pow(2).sum(dim=(-2, -1)).mean()
        aux = self.aux_loss(x, recon, pre, step_input.dead_neuron_mask)
        self._update_threshold(scores, first=step_input.n_training_steps == 0)
        with torch.no_grad():
            feature_acts = torch.zeros_like(pre).flatten()
            feature_acts[flat] = values.detach()
            feature_acts = feature_acts.view_as(pre)
        return TrainStepOutput(
            sae_in=x,
            sae_out=recon,
            feature_acts=feature_acts,
            hidden_pre=pre,
            loss=mse + aux,
            losses={"mse_loss": mse, "auxiliary_reconstruction_loss": aux},
            metrics={"threshold": self.threshold.item, "k": k},
        )

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        loss = self.aux_loss(step_input.sae_in, sae_out, hidden_pre, step_input.dead_neuron_mask)
        return {"auxiliary_reconstruction_loss": loss}

    def aux_loss(
        self,
        x: Float[Tensor, "batch n_models d_model"],
        recon: Float[Tensor, "batch n_models d_model"],
        pre: Float[Tensor, "batch d_sae"],
        dead: Tensor | None,
    ) -> Float[Tensor, ""]:
        """Top-k_aux dead latents reconstruct the residual (no bias); weighted here, once."""
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead == 0 or self.cfg.aux_loss_coefficient == 0:
            return pre.new_zeros(())
        assert dead is not None
        k_aux_nominal = self.cfg.k_aux or self.cfg.d_in // 2
        k_aux = min(k_aux_nominal, n_dead)
        scale = min(n_dead / k_aux_nominal, 1.0)
        residual = (x - recon).detach().flatten(1)
        with torch.no_grad():
            masked = pre.detach().masked_fill(~dead.to(pre.device)[None, :], float("-inf"))
            top = masked.topk(k_aux, dim=-1, sorted=False).indices  # [batch, k_aux]
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
        values = self.selected_pre_activations(pre, x, rows, top.flatten()).relu()
        flat_dec = self.W_dec.reshape(self.cfg.d_sae, self.cfg.d_in)
        aux_recon = F.embedding_bag(
            top, flat_dec, mode="sum", per_sample_weights=values.view_as(top)
        )
        error = (aux_recon - residual).pow(2).sum(-1).mean()
        return self.cfg.aux_loss_coefficient * scale * error

    @torch.no_grad()
    def _update_threshold(self, scores: Tensor, *, first: bool) -> None:
        positive = scores[scores > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        rate = 1.0 if first else self.cfg.threshold_lr
        self.threshold.mul_(1 - rate).add_(rate * smallest)

    def to_inference(self) -> CrossCoder:
        """The inference `CrossCoder` with these weights (same state dict)."""
        cc = CrossCoder(self.cfg.inference_config())
        cc.load_state_dict(self.state_dict())
        return cc
