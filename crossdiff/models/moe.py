"""crossdiff's Mixture-of-Experts MLP: a drop-in for TransformerLens's `MoE` with expert hooks,
grouped dispatch and the auxiliary losses a trainer needs.

Parameters have TransformerLens's names and shapes (`W_gate` is the router, `experts.{i}.W_in`,
`.W_gate`, `.W_out` are `nn.Linear` without bias) and the routing math is the same (softmax over
all experts in float32, top-k, optional renormalisation), so state dicts move both ways.

Dispatch: token slots are sorted by expert and each expert runs once on its contiguous block. On
CUDA in bfloat16 all experts run as three grouped matmuls (crossdiff.models.grouped_mm). In
the common case (SiLU experts, nothing hooked inside an expert, no autocast) all experts run in
one autograd Function with a hand-written backward (`_GroupedSwiGLU`); otherwise each expert
module is called on its block, which runs its own hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.components.mlps.can_be_used_as_mlp import CanBeUsedAsMLP
from transformer_lens.components.mlps.moe import MoEGatedMLP
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedTransformer import HookedTransformer

from crossdiff.models.grouped_mm import grouped_mm_usable, try_grouped_swiglu
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import all_reduce_sum_

DEFAULT_LOAD_BALANCE_COEF = 0.01
DEFAULT_Z_LOSS_COEF = 0.001


class CrossdiffMoE(CanBeUsedAsMLP):
    """Top-k routed gated-MLP experts.

    Hooks (per block L, under `blocks.L.mlp.`). The two stock names carry stock TransformerLens's
    tensors; crossdiff's extra quantities have names of their own:
      hook_router_logits  [batch, pos, num_experts]  router logits before the softmax
      hook_expert_weights [batch*pos, num_experts]   stock: softmax over all experts (float32)
      hook_expert_indices [batch*pos, top_k]         stock: which experts were selected
      hook_topk_weights   [batch, pos, top_k]        routing weight of each selected expert
                                                     (after `norm_topk_prob`), as used
      hook_topk_indices   [batch, pos, top_k]        the selected experts, per token
      hook_expert_out     [batch, pos, top_k, d_model] each selected expert's weighted output;
                                                     the block's output is their sum over top_k
    They fire in that order and each value is used after its hook, so patching the softmax
    re-selects experts (as in stock), patching indices or top-k weights re-routes, and patching
    expert_out changes the output.

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
        # stock TransformerLens names and tensors (see RESEARCH.md: the softmax, not the top-k)
        self.hook_expert_weights = HookPoint()  # [batch*pos, num_experts]
        self.hook_expert_indices = HookPoint()  # [batch*pos, top_k]
        self.hook_topk_weights = HookPoint()  # [batch, pos, top_k]
        self.hook_topk_indices = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_out = HookPoint()  # [batch, pos, top_k, d_model]

        self.last_load_balance_loss: Tensor | None = None
        self.last_z_loss: Tensor | None = None
        self.last_aux_loss: Tensor | None = None
        # set by the data-parallel trainer: routed-slot counts are summed over ranks, so the
        # load-balancing loss is the global batch's (see _record_aux_losses)
        self.global_load_balance = False

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        batch, pos, d_model = x.shape
        router_logits = self.hook_router_logits(self.W_gate(x))
        weights, indices, probs = self._route(router_logits, x.dtype)
        weights = self.hook_topk_weights(weights.view(batch, pos, self.experts_per_token))
        indices = self.hook_topk_indices(indices.view(batch, pos, self.experts_per_token))

        slot_experts = indices.reshape(-1)
        order = torch.argsort(slot_experts, stable=True)  # slots grouped by expert
        counts = torch.bincount(slot_experts, minlength=self.num_experts)
        x_flat = x.reshape(-1, d_model)
        expert_weights = [w.weight for e in self.experts for w in (e.W_gate, e.W_in, e.W_out)]
        # CUDA in bfloat16: torch's grouped matmul (crossdiff.models.grouped_mm); None elsewhere
        slot_out = self._grouped_mm_experts(x_flat, order, counts, expert_weights)
        if slot_out is None and self._fast_path_ok(x, expert_weights):
            slot_out = _GroupedSwiGLU.apply(
                x_flat, order, counts.tolist(), self.experts_per_token, *expert_weights
            )
        elif slot_out is None:
            slot_out = self._run_expert_modules(x_flat, order, counts)
        expert_out = slot_out.view(batch, pos, self.experts_per_token, d_model)
        expert_out = self.hook_expert_out(expert_out * weights.unsqueeze(-1))
        self._record_aux_losses(router_logits, probs, counts)
        return expert_out.sum(dim=2)

    def _route(
        self, router_logits: Float[Tensor, "batch pos experts"], dtype: torch.dtype
    ) -> tuple[
        Float[Tensor, "tokens top_k"], Int[Tensor, "tokens top_k"], Float[Tensor, "tokens experts"]
    ]:
        """Stock TransformerLens routing: softmax over all experts in float32 (hooked as
        `hook_expert_weights`), its top-k, optional renormalisation. Returns the top-k weights in
        `dtype`, the selected experts and the softmax (for the load-balancing loss)."""
        probs = F.softmax(router_logits.reshape(-1, self.num_experts), dim=-1, dtype=torch.float)
        probs = self.hook_expert_weights(probs)
        weights, indices = torch.topk(probs, self.experts_per_token, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        indices = self.hook_expert_indices(indices)
        return weights.to(dtype), indices, probs

    def _grouped_mm_experts(
        self,
        x: Float[Tensor, "tokens d_model"],
        order: Int[Tensor, " slots"],
        counts: Int[Tensor, " experts"],
        expert_weights: list[Tensor],
    ) -> Float[Tensor, "slots d_model"] | None:
        """The experts as three grouped matmuls when the kernel applies (CUDA, bfloat16, SiLU,
        nothing hooked inside an expert; see grouped_mm_usable), else None."""
        d_mlp = expert_weights[0].shape[0]
        usable = grouped_mm_usable(x, expert_weights[0].dtype, x.shape[-1], d_mlp)
        if not usable or self.experts[0].act_fn is not F.silu or self._expert_hooks_used():
            return None
        w_gate, w_in, w_out = (torch.stack(list(ws)) for ws in _per_kind(expert_weights))
        return try_grouped_swiglu(x, order, counts, self.experts_per_token, w_gate, w_in, w_out)

    def _expert_hooks_used(self) -> bool:
        return any(
            hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks
            for expert in self.experts
            for hp in (expert.hook_gate, expert.hook_pre, expert.hook_post)
        )

    def _fast_path_ok(self, x: Tensor, expert_weights: list[Tensor]) -> bool:
        """`_GroupedSwiGLU` computes SiLU experts without calling their modules, in x's dtype,
        so it is used only when nothing is hooked inside an expert (hook_gate/pre/post), the
        activation is SiLU, and there is no autocast or mixed dtype to apply."""
        if self.experts[0].act_fn is not F.silu or torch.is_autocast_enabled(x.device.type):
            return False
        if any(w.dtype != x.dtype for w in expert_weights):
            return False
        return not any(
            hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks
            for expert in self.experts
            for hp in (expert.hook_gate, expert.hook_pre, expert.hook_post)
        )

    def _run_expert_modules(
        self,
        x: Float[Tensor, "tokens d_model"],
        order: Int[Tensor, " slots"],
        counts: Int[Tensor, " experts"],
    ) -> Float[Tensor, "slots d_model"]:
        """Each expert module on its contiguous block of sorted slots, back in slot order (slot s
        belongs to token s // top_k); runs the experts' own hooks."""
        blocks = x[order // self.experts_per_token].split(counts.tolist())
        out_sorted = torch.cat([expert(b) for expert, b in zip(self.experts, blocks, strict=True)])
        return out_sorted.new_empty(out_sorted.shape).index_copy(0, order, out_sorted)

    def _record_aux_losses(
        self,
        router_logits: Float[Tensor, "batch pos experts"],
        probs: Float[Tensor, "tokens experts"],
        counts: Int[Tensor, " experts"],
    ) -> None:
        # Switch Transformer load balancing: E * sum_i (share of slots routed to i) * (mean
        # router probability of i); 1.0 when both are uniform. Router z-loss: mean logsumexp^2.
        if self.global_load_balance and self.training and torch.is_grad_enabled():
            # with the global shares, each rank's gradient of share . mean_prob(its tokens),
            # averaged by DDP, is the gradient of the global batch's loss
            counts = all_reduce_sum_(counts.clone())
        slot_share = counts.to(probs.dtype) / counts.sum()
        mean_prob = probs.reshape(-1, self.num_experts).mean(dim=0)
        self.last_load_balance_loss = self.num_experts * (slot_share * mean_prob).sum()
        self.last_z_loss = torch.logsumexp(router_logits.float(), dim=-1).square().mean()
        self.last_aux_loss = (
            self.load_balance_coef * self.last_load_balance_loss
            + self.z_loss_coef * self.last_z_loss
        )


class _GroupedSwiGLU(torch.autograd.Function):
    """Every expert, SiLU(x W_gate^T) * (x W_in^T) W_out^T, on its block of expert-sorted slots,
    returning the unweighted outputs in slot order. The same matmuls as the expert modules, but
    with a hand-written backward and none of the per-op autograd bookkeeping. Each expert's work
    runs start to finish on its own block, so its activations are still in cache (measured
    faster on CPU than elementwise passes over all slots at once)."""

    @staticmethod
    def forward(ctx, x, order, sizes, top_k, *weights):
        tokens = order // top_k
        x_sorted = x.index_select(0, tokens)
        y_sorted = torch.empty_like(x_sorted)
        saved = []
        for x_e, y_e, w_gate, w_in, w_out in zip(
            x_sorted.split(sizes), y_sorted.split(sizes), *_per_kind(weights), strict=True
        ):
            gate, up = x_e @ w_gate.t(), x_e @ w_in.t()
            act = F.silu(gate)
            post = act * up
            torch.mm(post, w_out.t(), out=y_e)
            saved += [gate, up, act, post]
        ctx.save_for_backward(x_sorted, tokens, order, *weights, *saved)
        ctx.sizes, ctx.n_tokens = sizes, x.shape[0]
        # back to slot order by a gather through the inverse permutation (a scatter with
        # index_copy costs several times more on CPU)
        slot_to_sorted = torch.empty_like(order)
        slot_to_sorted[order] = torch.arange(len(order), device=order.device)
        return y_sorted.index_select(0, slot_to_sorted)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x_sorted, tokens, order, *rest = ctx.saved_tensors
        n_weights = 3 * len(ctx.sizes)
        weights, saved = rest[:n_weights], rest[n_weights:]
        need_x = ctx.needs_input_grad[0]
        grad_sorted = grad_y.index_select(0, order)
        grad_x_sorted = torch.empty_like(x_sorted) if need_x else x_sorted
        grad_weights = []
        for e, (x_e, g, grad_x_e, w_gate, w_in, w_out) in enumerate(
            zip(
                x_sorted.split(ctx.sizes),
                grad_sorted.split(ctx.sizes),
                grad_x_sorted.split(ctx.sizes),
                *_per_kind(weights),
                strict=True,
            )
        ):
            gate, up, act, post = saved[4 * e : 4 * e + 4]
            grad_post = g @ w_out
            grad_up = grad_post * act
            grad_gate = torch.ops.aten.silu_backward(grad_post.mul_(up), gate)
            grad_weights += [grad_gate.t() @ x_e, grad_up.t() @ x_e, g.t() @ post]
            if need_x:
                torch.mm(grad_gate, w_gate, out=grad_x_e).addmm_(grad_up, w_in)
        grad_x = None
        if need_x:
            grad_x = x_sorted.new_zeros(ctx.n_tokens, x_sorted.shape[1])
            grad_x.index_add_(0, tokens, grad_x_sorted)
        return grad_x, None, None, None, *grad_weights


def _per_kind(weights: Sequence[Tensor]) -> tuple[Sequence[Tensor], ...]:
    """(W_gate, W_in, W_out, W_gate, ...) -> (all W_gate, all W_in, all W_out)."""
    return weights[0::3], weights[1::3], weights[2::3]


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
