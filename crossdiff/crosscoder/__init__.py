"""The crosscoder stage: a BatchTopK crosscoder with designated shared latents, built on SAELens.

Importing this module registers the architecture "crosscoder" with SAELens (inference and
training registries), so `sae_lens.SAE.load_from_disk(dir)` loads a saved crosscoder.
"""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from crossdiff.crosscoder.config import CrossCoderConfig, TrainingCrossCoderConfig, default_lr
from crossdiff.crosscoder.metrics import evaluate_crosscoder
from crossdiff.crosscoder.model import CrossCoder
from crossdiff.crosscoder.trainer import fold_scaling_factors, train_crosscoder
from crossdiff.crosscoder.training import TrainingCrossCoder

if "crosscoder" not in SAE_CLASS_REGISTRY:
    register_sae_class("crosscoder", CrossCoder, CrossCoderConfig)
if "crosscoder" not in SAE_TRAINING_CLASS_REGISTRY:
    register_sae_training_class("crosscoder", TrainingCrossCoder, TrainingCrossCoderConfig)

__all__ = [
    "CrossCoder",
    "CrossCoderConfig",
    "TrainingCrossCoder",
    "TrainingCrossCoderConfig",
    "default_lr",
    "evaluate_crosscoder",
    "fold_scaling_factors",
    "train_crosscoder",
]
