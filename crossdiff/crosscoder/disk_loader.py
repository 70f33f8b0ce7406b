"""Reading a saved crosscoder folder through SAELens's disk loader, with the pre-rename architecture
name ("crosscoder") read as the current one. It imports nothing of the crosscoder's classes, so
CrossCoder.load can use it without a cycle (registration.py, which registers those classes,
imports it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader
from sae_lens.registry import SAE_CLASS_REGISTRY

from crossdiff.crosscoder.config import ARCHITECTURE
from crossdiff.plumbing.common import CrossdiffError

LEGACY_ARCHITECTURE = "crosscoder"  # the name folders saved before the rename carry

_IMPORT_NOTE = (
    "`import crossdiff` (or crossdiff.crosscoder) registers the crosscoder with SAELens; run it "
    "before `sae_lens.SAE.load_from_disk`, or load with `crossdiff.load_crosscoder(path)`"
)


def crossdiff_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens's disk loader, with the pre-rename architecture name read as the current one."""
    cfg_dict, state_dict = sae_lens_disk_loader(path, device, cfg_overrides=cfg_overrides)
    architecture = cfg_dict.get("architecture")
    if architecture == LEGACY_ARCHITECTURE:
        cfg_dict["architecture"] = ARCHITECTURE
    elif architecture != ARCHITECTURE:
        raise CrossdiffError(
            f"{path} holds an SAELens {architecture!r} SAE, not a crossdiff crosscoder "
            f"(architecture {ARCHITECTURE!r}); load it with sae_lens.SAE.load_from_disk"
        )
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        raise CrossdiffError(f"the crosscoder is not registered with SAELens; {_IMPORT_NOTE}")
    return cfg_dict, state_dict
