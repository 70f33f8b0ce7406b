"""The crosscoder stage: a BatchTopK crosscoder with designated shared latents, built on SAELens.

Importing this module registers the architecture "crossdiff.crosscoder" (and the pre-rename alias
"crosscoder" where free) with SAELens's inference and training registries, so
`sae_lens.SAE.load_from_disk(dir)` loads a saved crosscoder. The trainer and the metrics, which
pull in the activation store and the data stage, load on first use.
"""

from __future__ import annotations

from crossdiff.integrations.lens import explain_import_error

try:  # SAELens 6 imports HookedTransformer: on TransformerLens 4 an error that says so
    from crossdiff.crosscoder.config import (
        ARCHITECTURE,
        CrossCoderConfig,
        TrainingCrossCoderConfig,
        default_lr,
    )
    from crossdiff.crosscoder.model import CrossCoder
    from crossdiff.crosscoder.registration import load_crosscoder, register_with_sae_lens
    from crossdiff.crosscoder.training_sae import TrainingCrossCoder
except ImportError as _err:
    explain_import_error(_err, "crossdiff.crosscoder (an SAELens SAE)")
    raise
from crossdiff.plumbing.lazy import lazy_exports

register_with_sae_lens()

_LAZY = {
    "evaluate_crosscoder": "crossdiff.crosscoder.metrics",
    "fold_scaling_factors": "crossdiff.crosscoder.train",
    "push_to_hub": "crossdiff.crosscoder.hub",
    "train_crosscoder": "crossdiff.crosscoder.train",
}

__all__ = [
    "ARCHITECTURE",
    "CrossCoder",
    "CrossCoderConfig",
    "TrainingCrossCoder",
    "TrainingCrossCoderConfig",
    "default_lr",
    "evaluate_crosscoder",
    "fold_scaling_factors",
    "load_crosscoder",
    "push_to_hub",
    "register_with_sae_lens",
    "train_crosscoder",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
