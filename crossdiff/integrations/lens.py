"""Which TransformerLens is installed, and what of crossdiff runs on it.

TransformerLens 3 has both `HookedTransformer` and `TransformerBridge`; TransformerLens 4 removed
`HookedTransformer`. crossdiff's own models (dense and MoE), their training, the MoE swap and
loading a crossdiff model folder are HookedTransformers, so they need TransformerLens 3; harvest,
the crosscoder and the analysis take any model with named hook points (a TransformerBridge too)
and import no `HookedTransformer` at module level. `explain_import_error` turns the ImportError
of the former (and of SAELens, which imports it too) on TransformerLens 4 into an error that says
so (docs/models.md).
"""

from __future__ import annotations

from importlib import metadata

from torch import nn

from crossdiff.plumbing.common import CrossdiffError

# a model TransformerLens runs with named hook points: a HookedTransformer or a TransformerBridge
# (a plain nn.Module type here, so annotations need neither class and hold on TransformerLens 4)
LensModel = nn.Module

__all__ = [
    "LensModel",
    "explain_import_error",
    "has_hooked_transformer",
    "sae_lens_tl_requirement",
    "tl_version",
]


def tl_version() -> str:
    try:
        return metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        return "not installed"


def sae_lens_tl_requirement() -> str | None:
    """SAELens's own requirement on TransformerLens, as its installed metadata states it (SAELens
    6.54: `transformer-lens>=2.16.1,<4.0.0`)."""
    try:
        requires = metadata.requires("sae-lens") or []
    except metadata.PackageNotFoundError:
        return None
    for line in requires:
        if line.replace("_", "-").lower().startswith("transformer-lens"):
            return line
    return None


def has_hooked_transformer() -> bool:
    try:
        import transformer_lens
    except ImportError:
        return False
    return getattr(transformer_lens, "HookedTransformer", None) is not None


def explain_import_error(err: ImportError, what: str) -> None:
    """Raise a CrossdiffError for `err` when it comes from TransformerLens 4 (no HookedTransformer
    to import, for crossdiff or for SAELens); return otherwise, so the caller re-raises `err`."""
    if has_hooked_transformer():
        return
    try:
        sae_lens = metadata.version("sae-lens")
    except metadata.PackageNotFoundError:
        sae_lens = None
    pin = sae_lens_tl_requirement()
    note = (
        f" SAELens {sae_lens}, which the crosscoder is built on, requires {pin!r} (its "
        "Requires-Dist), so it does not import on TransformerLens 4 either."
        if sae_lens and pin
        else ""
    )
    raise CrossdiffError(
        f"{what} needs transformer_lens.HookedTransformer, which TransformerLens {tl_version()} "
        f"does not have (TransformerLens 4 removed it; the import failed with: {err}).{note} "
        "Install TransformerLens 3: pip install 'transformer-lens>=3,<4' (docs/models.md says "
        "what runs on which TransformerLens)"
    ) from err
