"""crossdiff's Mixture-of-Experts MLP: a drop-in for TransformerLens's `MoE` with expert hooks,
grouped dispatch and the auxiliary losses a trainer needs.

Parameters have TransformerLens's names and shapes (`W_gate` is the router, `experts.{i}.W_in`,
`.W_gate`, `.W_out` are `nn.Linear` without bias) and the routing math is the same (softmax over
all experts in float32, top-k, optional renormalisation), so state dicts move both ways.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.components.mlps.can_be_used_as_mlp import CanBeUsedAsMLP
from transformer_lens.components.mlps.moe import MoEGatedMLP
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedTransformer import HookedTransformer

from crossdiff.common import CrossdiffError

DEFAULT_LOAD_BALANCE_COEF = 0.01
DEFAULT_Z_LOSS_COEF = 0.001


class CrossdiffMoE(CanBeUsedAsMLP):
    """Top-k routed gated-MLP experts.

    Hooks (per block L, under `blocks.L.mlp.`):
      hook_router_logits  [batch, pos, num_experts]  router logits before the softmax
      hook_expert_weights [batch, pos, top_k]        routing weight of each selected expert
      hook_expert_indices [batch, pos, top_k]        which experts were selected
      hook_expert_out     [batch, pos, top_k, d_model] each selected expert's weighted output;
                                                     the block's output is their sum over top_k
    Patching weights or indices changes the routing; patching expert_out changes the output.

    After every forward, `last_load_balance_loss`, `last_z_loss` (unweighted) and `last_aux_loss`
    (weighted sum) hold the auxiliary losses of that call; `moe_aux_loss(model)` adds them up.
    """

    def __init__(
        self,
        cfg,
        load_balance_coef: float = DEFAULT_LOAD_BALANCE_COEF,
        z_loss_coef: float = DEFAULT_Z_LOSS_COEF,
    ):
        super().__init__(cfg)
        n, k = self.cfg.num_experts, self.cfg.experts_per_token
        if not n or not k or k > n:
            raise CrossdiffError(
                f"CrossdiffMoE needs 1 <= experts_per_token <= num_experts, got "
                f"experts_per_token={k!r}, num_experts={n!r}; fix the config (see moe_config)"
            )
        self.num_experts: int = n
        self.experts_per_token: int = k
        self.load_balance_coef = load_balance_coef
        self.z_loss_coef = z_loss_coef

        self.experts = nn.ModuleList([MoEGatedMLP(self.cfg) for _ in range(n)])
        self.W_gate = nn.Linear(self.cfg.d_model, n, bias=False)  # the router

        self.hook_router_logits = HookPoint()  # [batch, pos, num_experts]
        self.hook_expert_weights = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_indices = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_out = HookPoint()  # [batch, pos, top_k, d_model]

        self.last_load_balance_loss: Tensor | None = None
        self.last_z_loss: Tensor | None = None
        self.last_aux_loss: Tensor | None = None

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        batch, pos, d_model = x.shape
        router_logits = self.hook_router_logits(self.W_gate(x))
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, self.experts_per_token, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = self.hook_expert_weights(weights.to(x.dtype))
        indices = self.hook_expert_indices(indices)

        slot_out, counts = self._run_experts(x.reshape(-1, d_model), indices.reshape(-1))
        expert_out = slot_out.view(batch, pos, self.experts_per_token, d_model)
        expert_out = self.hook_expert_out(expert_out * weights.unsqueeze(-1))
        self._record_aux_losses(router_logits, probs, counts)
        return expert_out.sum(dim=2)

    def _run_experts(
        self, x: Float[Tensor, "tokens d_model"], slot_experts: Int[Tensor, " slots"]
    ) -> tuple[Float[Tensor, "slots d_model"], Int[Tensor, " experts"]]:
        """Each token-slot through its expert: slots sorted by expert, one call per expert on a
        contiguous block, then put back in slot order (slot s belongs to token s // top_k)."""
        order = torch.argsort(slot_experts, stable=True)
        counts = torch.bincount(slot_experts, minlength=self.num_experts)
        x_sorted = x[order // self.experts_per_token]
        blocks = x_sorted.split(counts.tolist())
        out_sorted = torch.cat([expert(b) for expert, b in zip(self.experts, blocks, strict=True)])
        return out_sorted.new_empty(out_sorted.shape).index_copy(0, order, out_sorted), counts

    def _record_aux_losses(
        self,
        router_logits: Float[Tensor, "batch pos experts"],
        probs: Float[Tensor, "batch pos experts"],
        counts: Int[Tensor, " experts"],
    ) -> None:
        # Switch Transformer load balancing: E * sum_i (share of slots routed to i) * (mean
        # router probability of i); 1.0 when both are uniform. Router z-loss: mean logsumexp^2.
        slot_share = counts.to(probs.dtype) / counts.sum()
        mean_prob = probs.reshape(-1, self.num_experts).mean(dim=0)
        self.last_load_balance_loss = self.num_experts * (slot_share * mean_prob).sum()
        self.last_z_loss = torch.logsumexp(router_logits.float(), dim=-1).square().mean()
        self.last_aux_loss = (
            self.load_balance_coef * self.last_load_balance_loss
            + self.z_loss_coef * self.last_z_loss
        )


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted auxiliary losses of every CrossdiffMoE in `model` from its last
    forward; 0 for a model without one."""
    losses = [
        m.last_aux_loss
        for m in model.modules()
        if isinstance(m, CrossdiffMoE) and m.last_aux_loss is not None
    ]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).sum()


def moe_modules(model: HookedTransformer) -> list[CrossdiffMoE]:
    return [m for m in model.modules() if isinstance(m, CrossdiffMoE)]
