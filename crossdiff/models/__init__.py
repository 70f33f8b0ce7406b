"""Dense and MoE language models: configs and presets, crossdiff's MoE with expert hooks (also
swapped into pretrained MoEs), model folders, and the trainer that trains both on the same
tokens."""

from crossdiff.integrations.lens import explain_import_error

try:  # on TransformerLens 4 (no HookedTransformer): an error that says so, not a traceback
    from crossdiff.models.build import build_model, is_moe
    from crossdiff.models.configs import (
        PRESETS,
        Preset,
        count_parameters,
        dense_config,
        matched_configs,
        moe_config,
    )
    from crossdiff.models.evaluate import expert_load, heldout_cross_entropy, unigram_cross_entropy
    from crossdiff.models.io import load_model, save_model
    from crossdiff.models.moe import CrossdiffMoE, moe_aux_loss
    from crossdiff.models.swap import CrossdiffGptOssMoE, swap_in_crossdiff_moe
    from crossdiff.models.train import TrainedModels, train_language_models
except ImportError as _err:
    explain_import_error(
        _err,
        "crossdiff.models (crossdiff's dense and MoE models, their training, "
        "swap_in_crossdiff_moe, crossdiff model folders)",
    )
    raise

__all__ = [
    "PRESETS",
    "CrossdiffGptOssMoE",
    "CrossdiffMoE",
    "Preset",
    "TrainedModels",
    "build_model",
    "count_parameters",
    "dense_config",
    "expert_load",
    "heldout_cross_entropy",
    "is_moe",
    "load_model",
    "matched_configs",
    "moe_aux_loss",
    "moe_config",
    "save_model",
    "swap_in_crossdiff_moe",
    "train_language_models",
    "unigram_cross_entropy",
]
