"""The training crosscoder: a SAELens `TrainingSAE` that SAELens's `SAETrainer` drives.

One training step: pre-activations (dense encoder), BatchTopK selection on decoder-norm-weighted
scores, sparse decoding of the k * batch selected latents, MSE summed over models and width, the
auxiliary top-k loss on dead latents (its coefficient applied here, once: the trainer only sums),
and the moving-average update of the inference threshold. The seed paper's fork options
(cfg.recon_loss "l2", shared_penalty "sparsity", aux_loss "fork", threshold_schedule "ema")
replace the matching part; docs/crosscoder.md lists them.

Under torchrun each rank holds a slice of the global batch. BatchTopK then selects over the global
batch (the k * batch largest scores of all ranks, found from an all-gather of each rank's
candidates), and the threshold update takes the global minimum, so the selection, the threshold
and therefore the run are those of one process with the same global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from torch import Tensor

from crossdiff.crosscoder.config import TrainingCrossCoderConfig
from crossdiff.crosscoder.model import CrossCoder, CrossCoderWeights, selection_scores
from crossdiff.plumbing.distributed import all_gather_cat, all_reduce_min_, dist_info


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
        if dist_info().enabled:
            flat, scores = self.select_global_batch_topk(pre, k)
        else:
            flat, scores = self.select_batch_topk(pre, k)
        rows, latents = flat // self.cfg.d_sae, flat % self.cfg.d_sae
        values = self.selected_pre_activations(pre, x, rows, latents).relu()
        recon = self.decode_sparse(flat, values, batch).float()
        mse = (recon - x).pow(2).sum(dim=(-2, -1)).mean()
        aux = self.aux_loss(x, recon, pre, step_input.dead_neuron_mask)
        self._update_threshold(scores, step=step_input.n_training_steps)
        losses = {"mse_loss": mse, "auxiliary_reconstruction_loss": aux}
        loss = mse + aux
        if self.cfg.recon_loss == "l2":
            # the fork's: each model's error norm, mean over tokens and models (mse stays logged)
            losses["l2_loss"] = (recon - x).norm(dim=-1).mean()
            loss = losses["l2_loss"] + aux
        if self.cfg.shared_penalty == "sparsity":
            losses["sparsity_loss"] = self.sparsity_penalty(latents, values, batch)
            loss = loss + losses["sparsity_loss"]
        with torch.no_grad():
            feature_acts = torch.zeros_like(pre).flatten()
            feature_acts[flat] = values.detach()
            feature_acts = feature_acts.view_as(pre)
            # (feature_acts > 0).sum(0) from the k * batch selected entries, not the dense grid
            fires = pre.new_zeros(self.cfg.d_sae, dtype=torch.float32)
            fires.index_add_(0, latents, (values.detach() > 0).float())
        output = TrainStepOutput(
            sae_in=x,
            sae_out=recon,
            feature_acts=feature_acts,
            hidden_pre=pre,
            loss=loss,
            losses=losses,
            metrics={"threshold": self.threshold.item, "k": k},
        )
        output.latent_fires = fires  # type: ignore[attr-defined]  # read by CrossCoderTrainer
        return output

    def sparsity_penalty(
        self,
        latents: Int[Tensor, " n_selected"],
        values: Float[Tensor, " n_selected"],
        batch: int,
    ) -> Float[Tensor, ""]:
        """The fork's decoder-norm penalties (shared_penalty="sparsity"), batch means:
        sparsity_coefficient * sum_i f_i sum_m ||d_m,i|| over the ordinary latents, and
        shared_sparsity_coefficient * sum_i f_i ||mean_m d_m,i|| over the designated ones.
        Differentiable in both the activations and the decoder."""
        cfg = self.cfg
        W = self.W_dec
        weights = W.norm(dim=-1).sum(-1) * cfg.sparsity_coefficient
        if cfg.n_shared:
            shared = W[: cfg.n_shared].mean(1).norm(dim=-1) * cfg.shared_sparsity_coefficient
            weights = torch.cat([shared, weights[cfg.n_shared :]])
        return (values * weights[latents]).sum() / batch

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
        *,
        sync_free: bool | None = None,
    ) -> Float[Tensor, ""]:
        """Top-k_aux dead latents reconstruct the residual (no bias); weighted here, once.

        cfg.aux_loss "saelens": k_aux = d_in // 2, the dead latents with the largest
        pre-activations, squared error scaled by min(n_dead / k_aux, 1). "fork": k_aux = d_model
        // 2 (one model's width), the dead latents with the largest code-weighted activations
        (ReLU(pre) * selection weights), squared error divided by the residual's variance about
        its batch mean (0 when that is not finite).

        On the CPU the dead latents are listed (a free read there): no work when there are none,
        and only their columns are ranked (no top-k at all when there are at most k_aux). On an
        accelerator (`sync_free`, default: not on the CPU) that read would stall the queue every
        step, so a fixed k_aux is taken over all latents and picks that are not dead get weight
        0, which gives the same loss."""
        cfg = self.cfg
        if dead is None or cfg.aux_loss_coefficient == 0:
            return pre.new_zeros((), dtype=torch.float32)
        dead = dead.to(pre.device)
        fork = cfg.aux_loss == "fork"
        k_aux_nominal = cfg.k_aux or (cfg.d_model if fork else sum(cfg.widths)) // 2
        n_dead = dead.sum()
        if sync_free is None:
            sync_free = pre.device.type != "cpu"
        columns = None  # all latents, the live ones masked; or (CPU) only the dead ones
        if not sync_free:
            columns = dead.nonzero().squeeze(1)
            if columns.numel() == 0:
                return pre.new_zeros((), dtype=torch.float32)
            k_aux = min(k_aux_nominal, columns.numel())
        else:
            k_aux = min(k_aux_nominal, cfg.d_sae)
        residual = (x - recon).detach().flatten(1).float()
        with torch.no_grad():
            ranked = pre.detach() if columns is None else pre.detach()[:, columns]
            if fork:
                weights = self.selection_weights()
                ranked = ranked.relu() * (weights if columns is None else weights[columns])
        aux_recon = self._dead_reconstruction(x, pre, dead, ranked, k_aux, columns)
        error = (aux_recon - residual).pow(2).sum(-1).mean()
        if fork:
            variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
            return cfg.aux_loss_coefficient * (error / variance).nan_to_num(0.0) * (n_dead > 0)
        scale = (n_dead / k_aux_nominal).clamp(max=1.0)
        return cfg.aux_loss_coefficient * scale * error

    def _dead_reconstruction(
        self,
        x: Float[Tensor, "batch n_models d_model"],
        pre: Float[Tensor, "batch d_sae"],
        dead: Tensor,
        ranked: Float[Tensor, "batch n_columns"],
        k_aux: int,
        columns: Int[Tensor, " n_columns"] | None = None,
    ) -> Float[Tensor, "batch d_in"]:
        """Each token's k_aux dead latents of largest ranking, decoded without the bias.

        `ranked` ranks the latents `columns` (all latents when None, the live ones then masked
        out). When `columns` are the dead latents and there are at most k_aux of them, every
        token takes them all, without a top-k."""
        with torch.no_grad():
            if columns is None:
                masked = ranked.masked_fill(~dead[None, :], float("-inf"))
                top = masked.topk(k_aux, dim=-1, sorted=False).indices  # [batch, k_aux]
            elif k_aux >= columns.numel():
                top = columns.expand(x.shape[0], -1).contiguous()
            else:
                top = columns[ranked.topk(k_aux, dim=-1, sorted=False).indices]
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
        values = self.selected_pre_activations(pre, x, rows, top.flatten()).relu()
        values = values * dead[top.flatten()]
        flat_dec = self.W_dec.reshape(self.cfg.d_sae, self.cfg.d_in)
        return F.embedding_bag(top, flat_dec, mode="sum", per_sample_weights=values.view_as(top))

    @torch.no_grad()
    def select_global_batch_topk(
        self, pre: Float[Tensor, "batch d_sae"], k: float
    ) -> tuple[Int[Tensor, " n_selected"], Float[Tensor, " n_selected"]]:
        """BatchTopK over the global batch of all ranks: keep this rank's scores among the
        k * global_batch largest of all ranks (every rank's candidates are gathered)."""
        scores = selection_scores(pre, self.selection_weights())
        n_keep = max(int(k * pre.shape[0] * dist_info().world_size), 1)
        # On the CPU, as in select_batch_topk, only scores above half the (synced) threshold are
        # candidates when all ranks together have enough of them; they are gathered whole. Else
        # each rank offers its n_keep largest. Ranks pad with -inf to a common length.
        floor = 0.5 * float(self.threshold) if scores.device.type == "cpu" else 0.0
        offer = None
        if floor > 0:
            candidates = scores[scores > floor]
            sizes = all_gather_cat(torch.tensor([candidates.numel()], device=scores.device))
            if int(sizes.sum()) >= n_keep:
                offer, width = candidates, int(sizes.max())
        if offer is None:
            width = min(n_keep, scores.numel())
            offer = scores.topk(width, sorted=False).values
        local = scores.new_full((width,), float("-inf"))
        local[: offer.numel()] = offer
        gathered = all_gather_cat(local)
        kth = gathered.kthvalue(gathered.numel() - min(n_keep, gathered.numel()) + 1).values
        # a zero score selects a zero value: leaving those out changes neither loss nor gradient
        indices = ((scores >= kth) & (scores > 0)).nonzero().squeeze(1)
        return indices, scores[indices]

    @torch.no_grad()
    def _update_threshold(self, scores: Tensor, *, step: int) -> None:
        """Move the threshold toward the smallest positive selected score (over all ranks),
        without reading anything back to the host.

        "rate": threshold_lr from step 0, where it is set outright. "ema": only after step
        threshold_start_step; set outright while still unset (0), then threshold_beta mixing.
        Both state and step live in the checkpoint, so a resumed run continues the same way."""
        cfg = self.cfg
        ema = cfg.threshold_schedule == "ema"
        if ema and step <= cfg.threshold_start_step:
            return
        inf = torch.tensor(float("inf"), device=scores.device, dtype=torch.float32)
        smallest = torch.where(scores > 0, scores.float(), inf).min() if scores.numel() else inf
        if dist_info().enabled:
            smallest = all_reduce_min_(smallest.clone())
        if ema:
            rate = torch.where(self.threshold > 0, 1 - cfg.threshold_beta, 1.0)
        else:
            rate = 1.0 if step == 0 else cfg.threshold_lr
        updated = self.threshold * (1 - rate) + rate * smallest.to(self.threshold.dtype)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.threshold))

    def to_inference(self) -> CrossCoder:
        """The inference `CrossCoder` with these weights (same state dict)."""
        cc = CrossCoder(self.cfg.inference_config())
        cc.load_state_dict(self.state_dict())
        return cc
