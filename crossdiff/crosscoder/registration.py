"""The crosscoder's place in SAELens's architecture registries, and loading a saved one.

crossdiff registers under the namespaced name "crossdiff.crosscoder" (inference and training
registries). Folders saved before the rename say "crosscoder" in cfg.json: that generic name is
registered as an alias when no other plugin holds it, and `load_crosscoder` translates it on load
either way, so old folders always load through crossdiff.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from crossdiff.crosscoder.config import ARCHITECTURE, CrossCoderConfig, TrainingCrossCoderConfig
from crossdiff.crosscoder.disk_loader import LEGACY_ARCHITECTURE, crossdiff_disk_loader
from crossdiff.crosscoder.hooked_sae import guard_add_sae
from crossdiff.crosscoder.hub import HF_SCHEME, download
from crossdiff.crosscoder.model import CrossCoder
from crossdiff.crosscoder.training_sae import TrainingCrossCoder
from crossdiff.plumbing.common import CrossdiffError

__all__ = [
    "LEGACY_ARCHITECTURE",
    "crossdiff_disk_loader",  # re-exported: its home is disk_loader.py, which model.py may import
    "load_crosscoder",
    "register_with_sae_lens",
]


def _same_class(held: type, ours: type) -> bool:
    # a re-imported module (importlib.reload, a second copy on sys.path) makes a new class object
    return held is ours or (
        held.__module__ == ours.__module__ and held.__qualname__ == ours.__qualname__
    )


def _describe(pair: tuple[type, type]) -> str:
    return f"{pair[0].__module__}.{pair[0].__qualname__}"


def _register(
    registry: dict[str, Any], name: str, pair: tuple[type, type], which: str, required: bool
) -> None:
    held = registry.get(name)
    if held is None or _same_class(held[0], pair[0]):
        registry[name] = pair
        return
    if required:
        raise CrossdiffError(
            f"SAELens's {which} registry already maps the architecture {name!r} to "
            f"{_describe(held)}, so crossdiff cannot register its CrossCoder there; another "
            "plugin took crossdiff's name: uninstall it or import it after crossdiff"
        )
    warnings.warn(
        f"SAELens's {which} architecture {name!r} belongs to {_describe(held)}; folders saved "
        f"by older crossdiff versions (architecture {name!r}) load with "
        "crossdiff.load_crosscoder(path), not with SAE.load_from_disk",
        stacklevel=3,
    )


def register_with_sae_lens() -> None:
    """Put the crosscoder into SAELens's inference and training registries (idempotent)."""
    inference = (CrossCoder, CrossCoderConfig)
    training = (TrainingCrossCoder, TrainingCrossCoderConfig)
    _register(SAE_CLASS_REGISTRY, ARCHITECTURE, inference, "inference", required=True)
    _register(SAE_TRAINING_CLASS_REGISTRY, ARCHITECTURE, training, "training", required=True)
    _register(SAE_CLASS_REGISTRY, LEGACY_ARCHITECTURE, inference, "inference", required=False)
    _register(
        SAE_TRAINING_CLASS_REGISTRY, LEGACY_ARCHITECTURE, training, "training", required=False
    )
    guard_add_sae()  # HookedSAETransformer.add_sae(crosscoder) refused with what to use instead


def load_crosscoder(path: str | Path, device: str = "cpu", dtype: str | None = None) -> CrossCoder:
    """Load a crosscoder saved by `CrossCoder.save` or `crossdiff train-crosscoder` (also one
    saved by an older crossdiff under the architecture name "crosscoder"), or one pushed with
    `crossdiff.push_to_hub`: `path` "hf://owner/name[/subfolder][@revision]"."""
    register_with_sae_lens()
    if str(path).startswith(HF_SCHEME):
        path = download(str(path))
    return CrossCoder.load(path, device=device, dtype=dtype)
