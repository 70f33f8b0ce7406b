"""`swap_in_crossdiff_moe`: crossdiff's MoE and its expert hooks in a pretrained HookedTransformer.

TransformerLens 3.x loads Mixtral and OLMoE with its stock `MoE` and GPT-OSS with `GptOssMoE`,
each with two hooks. `swap_in_crossdiff_moe(model)` replaces every one of them, in place, by a
`CrossdiffMoE` (or, for GPT-OSS, `CrossdiffGptOssMoE`) that holds the very same parameter tensors,
computes the same outputs and keeps the stock hooks' names and tensors, plus crossdiff's
router-logit, top-k and per-expert-output hooks (docs/models.md has the table).

```python
model = HookedTransformer.from_pretrained("allenai/OLMoE-1B-7B-0924", dtype="float32")
swap_in_crossdiff_moe(model)
_, cache = model.run_with_cache(tokens, names_filter=lambda n: "mlp.hook_" in n)
```
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.components.mlps.gpt_oss_moe import GptOssExpert, GptOssMoE
from transformer_lens.components.mlps.moe import MoE, MoEGatedMLP
from transformer_lens.HookedTransformer import HookedTransformer

from crossdiff.models.moe import DEFAULT_LOAD_BALANCE_COEF, DEFAULT_Z_LOSS_COEF, CrossdiffMoE
from crossdiff.plumbing.common import CrossdiffError


class CrossdiffGptOssMoE(CrossdiffMoE):
    """GPT-OSS's MoE as TransformerLens computes it (`GptOssMoE`) with crossdiff's hooks.

    The router has a bias; experts are selected by the top-k of the router logits and weighted by a
    softmax over those k logits. Stock `hook_expert_weights` is then the [batch*pos, num_experts]
    routing table with zeros for the experts not selected, exactly as in `GptOssMoE`, and the
    weights used are read from it, so patching it re-weights. The experts are TransformerLens's
    `GptOssExpert` (biases, clamped gate and up projections, `(up + 1) * gate * sigmoid(1.702
    gate)`), run through their own modules, so their `hook_gate/pre/post` work as in stock.
    """

    def __init__(
        self,
        cfg,
        load_balance_coef: float = DEFAULT_LOAD_BALANCE_COEF,
        z_loss_coef: float = DEFAULT_Z_LOSS_COEF,
    ):
        super().__init__(cfg, load_balance_coef=load_balance_coef, z_loss_coef=z_loss_coef)
        self.experts = nn.ModuleList([GptOssExpert(self.cfg) for _ in range(self.num_experts)])
        self.W_gate = nn.Linear(self.cfg.d_model, self.num_experts, bias=True)

    def _route(
        self, router_logits: Float[Tensor, "batch pos experts"], dtype: torch.dtype
    ) -> tuple[
        Float[Tensor, "tokens top_k"], Int[Tensor, "tokens top_k"], Float[Tensor, "tokens experts"]
    ]:
        logits = router_logits.reshape(-1, self.num_experts)
        top_logits, indices = torch.topk(logits, self.experts_per_token, dim=-1)
        top_weights = F.softmax(top_logits, dim=-1, dtype=torch.float)
        table = torch.zeros_like(logits, dtype=torch.float).scatter_(1, indices, top_weights)
        table = self.hook_expert_weights(table)
        indices = self.hook_expert_indices(indices)
        weights = table.to(dtype).gather(1, indices)
        # the load-balancing loss (training only) wants the router's distribution over all experts
        return weights, indices, F.softmax(logits, dim=-1, dtype=torch.float)

    def _fast_path_ok(self, x: Tensor, expert_weights: list[Tensor]) -> bool:
        return False  # the grouped kernel computes SiLU experts without biases


# stock class -> (its expert class, crossdiff's replacement); exact types only, since a subclass
# may compute something else
_REPLACEMENTS: dict[type, tuple[type, type[CrossdiffMoE]]] = {
    MoE: (MoEGatedMLP, CrossdiffMoE),
    GptOssMoE: (GptOssExpert, CrossdiffGptOssMoE),
}


def swap_in_crossdiff_moe(
    model: nn.Module,
    *,
    load_balance_coef: float = DEFAULT_LOAD_BALANCE_COEF,
    z_loss_coef: float = DEFAULT_Z_LOSS_COEF,
) -> HookedTransformer:
    """Replace every TransformerLens MoE block of `model` by crossdiff's, in place; returns `model`.

    The new blocks take over the stock blocks' parameter objects (same tensors, device, dtype and
    `requires_grad`; an optimizer holding them stays valid), so the model computes the same
    logits. Blocks that are already crossdiff's are left alone, so calling it twice is harmless.
    Raises `CrossdiffError` for a model without an MoE block, for an MoE class crossdiff cannot
    represent, and when hooks are attached to a block being replaced (remove them first:
    `model.reset_hooks()`).
    """
    if not isinstance(model, HookedTransformer):
        raise CrossdiffError(
            f"swap_in_crossdiff_moe needs a transformer_lens.HookedTransformer, got "
            f"{type(model).__name__}; load the model with HookedTransformer.from_pretrained(...) "
            "(a TransformerBridge runs Hugging Face's own MoE modules, which have no place for "
            "crossdiff's hooks)"
        )
    planned = []  # everything is checked before anything is replaced
    for layer, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        if mlp is None or isinstance(mlp, CrossdiffMoE):
            continue
        target = _replacement(mlp, layer)
        if target is not None:
            _refuse_attached_hooks(mlp, layer)
            planned.append((layer, block, target))
    for layer, block, target in planned:
        ours = _build_on_meta(target, model.cfg, load_balance_coef, z_loss_coef)
        block.mlp = _take_over(block.mlp, ours, layer)
    if not any(isinstance(getattr(block, "mlp", None), CrossdiffMoE) for block in model.blocks):
        raise CrossdiffError(
            f"model {model.cfg.model_name!r} has no Mixture-of-Experts block to swap "
            f"(num_experts={model.cfg.num_experts!r}); swap_in_crossdiff_moe is for MoE models "
            "such as Mixtral, OLMoE or GPT-OSS loaded with HookedTransformer.from_pretrained"
        )
    model.setup()  # register the new HookPoints in model.hook_dict
    return model


def _replacement(mlp: nn.Module, layer: int) -> type[CrossdiffMoE] | None:
    """crossdiff's class for a stock MoE block, None for a dense MLP, an error for an MoE class
    (or expert class) whose computation crossdiff's MoE does not reproduce."""
    entry = _REPLACEMENTS.get(type(mlp))
    if entry is None:
        if hasattr(mlp, "experts") or hasattr(mlp, "num_experts"):
            raise CrossdiffError(
                f"blocks.{layer}.mlp is a {type(mlp).__module__}.{type(mlp).__name__}, which "
                "crossdiff's MoE cannot represent (it reproduces TransformerLens's MoE and "
                "GptOssMoE exactly, not subclasses or other MoE classes); run this model "
                "with its stock hooks, or port the block to a CrossdiffMoE subclass"
            )
        return None
    expert_class, target = entry
    odd = sorted({type(e).__name__ for e in mlp.experts if type(e) is not expert_class})
    if odd:
        raise CrossdiffError(
            f"blocks.{layer}.mlp ({type(mlp).__name__}) has experts of type {odd}, expected "
            f"{expert_class.__name__}; crossdiff's MoE cannot reproduce them"
        )
    return target


def _refuse_attached_hooks(stock: nn.Module, layer: int) -> None:
    hooked = [
        name
        for name, module in stock.named_modules()
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
    ]
    if hooked:
        raise CrossdiffError(
            f"blocks.{layer}.mlp has hooks attached at {hooked}; they would be lost when the "
            "block is replaced. Remove them (model.reset_hooks()) before swap_in_crossdiff_moe"
        )


def _take_over(stock: nn.Module, ours: CrossdiffMoE, layer: int) -> CrossdiffMoE:
    """`ours` (built on the meta device) holding `stock`'s parameter objects."""
    requires_grad = {name: p.requires_grad for name, p in stock.named_parameters()}
    try:
        ours.load_state_dict(stock.state_dict(keep_vars=True), strict=True, assign=True)
    except RuntimeError as err:
        raise CrossdiffError(
            f"blocks.{layer}.mlp ({type(stock).__name__}): its parameters do not fit "
            f"{type(ours).__name__}: {err}"
        ) from err
    for name, param in ours.named_parameters():
        param.requires_grad_(requires_grad[name])
    return ours.train(stock.training)


def _build_on_meta(
    target: type[CrossdiffMoE], cfg, load_balance_coef: float, z_loss_coef: float
) -> CrossdiffMoE:
    with torch.device("meta"):  # no memory, no init: the stock tensors are assigned next
        return target(cfg, load_balance_coef=load_balance_coef, z_loss_coef=z_loss_coef)
