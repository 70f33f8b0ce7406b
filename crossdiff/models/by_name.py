"""The models the report splices and reads logit effects from, however the user names them: loaded
models (`{"dense": model_a, "moe": model_b}`), model folders by store model name
(`{"dense": "path/to/hf_folder"}`), or one folder with a folder per store model name (what
`crossdiff run` writes). A folder is a crossdiff model (its config.json says
"crossdiff.model/1": a HookedTransformer) or a Hugging Face checkpoint (loaded with
`TransformerBridge.boot_transformers`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import CrossdiffError

MODEL_FORMAT = "crossdiff.model/1"  # crossdiff.models.io's, read here without importing it


def is_crossdiff_model_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == MODEL_FORMAT
    except (ValueError, AttributeError):
        return False


def load_lens_model(folder: str | Path, device: Any = "cpu") -> Any:
    """A crossdiff model folder as a HookedTransformer, a Hugging Face folder as a Bridge."""
    folder = Path(folder)
    if is_crossdiff_model_folder(folder):
        from crossdiff.models import load_model

        return load_model(folder, device=device)
    if (folder / "config.json").is_file():
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(str(folder), device=str(device)).eval()
    raise CrossdiffError(
        f"{folder} is neither a crossdiff model folder nor a Hugging Face checkpoint (no "
        "config.json); pass the folder the model was saved to (save_model or save_pretrained)"
    )


def resolve_models(
    models: Mapping[str, Any] | str | Path | None,
    names: list[str],
    device: Any = "cpu",
    *,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """name -> loaded model for the store's model `names` (those in `only`, when given) that
    `models` names; a name with no model (no folder) is left out."""
    wanted = [n for n in names if only is None or n in only]
    if models is None:
        return {}
    if isinstance(models, Mapping):
        unknown = sorted(set(models) - set(names))
        if unknown:
            raise CrossdiffError(
                f"models were given for {unknown}, which the store does not have; its models are "
                f"{names} (name the models by the store's model names)"
            )
        out = {}
        for name in wanted:
            if name in models:
                given = models[name]
                is_path = isinstance(given, str | Path)
                out[name] = load_lens_model(given, device) if is_path else given
        return out
    folder = Path(models)
    return {n: load_lens_model(folder / n, device) for n in wanted if (folder / n).is_dir()}
