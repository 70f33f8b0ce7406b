"""`build_model`: a HookedTransformer with crossdiff's MoE in every MoE block."""

from __future__ import annotations

import warnings

from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components.mlps.moe import MoE

from crossdiff.models.moe import DEFAULT_LOAD_BALANCE_COEF, DEFAULT_Z_LOSS_COEF, CrossdiffMoE
from crossdiff.plumbing.common import CrossdiffError


def build_model(
    cfg: HookedTransformerConfig,
    *,
    load_balance_coef: float = DEFAULT_LOAD_BALANCE_COEF,
    z_loss_coef: float = DEFAULT_Z_LOSS_COEF,
) -> HookedTransformer:
    """A freshly initialised HookedTransformer for `cfg`.

    For an MoE config, each stock TransformerLens `MoE` is replaced by a `CrossdiffMoE` holding the
    same initial weights, so under the same torch seed the model equals `HookedTransformer(cfg)`
    parameter for parameter. The aux-loss coefficients are stored on the MoE modules.
    """
    if not isinstance(cfg, HookedTransformerConfig):
        raise CrossdiffError(
            f"build_model expects a HookedTransformerConfig (see dense_config/moe_config), "
            f"got {type(cfg).__name__}"
        )
    with warnings.catch_warnings():
        # TransformerLens 3.x marks HookedTransformer deprecated in favour of TransformerBridge,
        # which wraps Hugging Face models; a model trained from scratch still needs this class.
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    if cfg.num_experts:
        for block in model.blocks:
            if not isinstance(block.mlp, MoE):
                continue
            stock = block.mlp
            ours = CrossdiffMoE(cfg, load_balance_coef=load_balance_coef, z_loss_coef=z_loss_coef)
            ours.load_state_dict(stock.state_dict())
            param = next(stock.parameters())
            block.mlp = ours.to(device=param.device, dtype=param.dtype)
        model.setup()  # register the new HookPoints in model.hook_dict
    return model


def is_moe(model: HookedTransformer) -> bool:
    return any(isinstance(block.mlp, CrossdiffMoE) for block in model.blocks)
