"""Model folders: `config.json` (the HookedTransformerConfig, JSON-safe) + `model.safetensors`.

config.json:
  {"format": "crossdiff.model/1",
   "config": {HookedTransformerConfig fields; dtype as a string},
   "moe": {"load_balance_coef": ..., "z_loss_coef": ...} or null,
   "training": {...} (written by the trainer; absent for models saved by hand)}
model.safetensors holds `model.state_dict()` under TransformerLens's names, so
`HookedTransformer(cfg).load_state_dict(...)` in stock TransformerLens accepts it too.
model.safetensors.sha256 holds its checksum, verified on load (absent in older folders).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crossdiff.models.build import build_model
from crossdiff.models.moe import CrossdiffMoE
from crossdiff.plumbing.common import (
    CrossdiffError,
    atomic_path,
    dtype_name,
    read_json,
    resolve_device,
    resolve_dtype,
    tensors_nbytes,
    write_json_atomic,
)
from crossdiff.plumbing.integrity import (
    check_finite_tensors,
    sha256_of_file,
    verify_checksum,
    write_checksum,
)

MODEL_FORMAT = "crossdiff.model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def config_to_dict(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """Every HookedTransformerConfig field, JSON-safe (dtype as 'float32', device as a string)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, torch.dtype):
            value = dtype_name(value)
        elif isinstance(value, torch.device):
            value = str(value)
        out[f.name] = value
    return out


def config_from_dict(fields: dict[str, Any], device: str | None = None) -> HookedTransformerConfig:
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    kwargs = {k: v for k, v in fields.items() if k in known}
    if "dtype" in kwargs:
        kwargs["dtype"] = resolve_dtype(kwargs["dtype"])
    if device is not None:
        kwargs["device"] = device
    try:
        return HookedTransformerConfig(**kwargs)
    except (AssertionError, TypeError, ValueError) as err:
        raise CrossdiffError(f"the saved model config cannot be rebuilt: {err}") from err


def _moe_settings(model: HookedTransformer) -> dict[str, float] | None:
    for module in model.modules():
        if isinstance(module, CrossdiffMoE):
            return {
                "load_balance_coef": module.load_balance_coef,
                "z_loss_coef": module.z_loss_coef,
            }
    return None


def save_model(
    model: HookedTransformer, out_dir: str | Path, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write `out_dir/model.safetensors`, then `out_dir/config.json` (its presence marks a
    complete folder). `extra` adds top-level JSON keys, e.g. the training settings."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE, needed_bytes=tensors_nbytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": MODEL_FORMAT})
        digest = sha256_of_file(tmp)
    write_checksum(out_dir / WEIGHTS_FILE, digest)
    header = {
        "format": MODEL_FORMAT,
        "config": config_to_dict(model.cfg),
        "moe": _moe_settings(model),
        **(extra or {}),
    }
    write_json_atomic(out_dir / CONFIG_FILE, header)
    return out_dir


def read_model_header(model_dir: str | Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    header = read_json(model_dir / CONFIG_FILE, what="model config")
    if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT:
        raise CrossdiffError(
            f"{model_dir / CONFIG_FILE} is not a crossdiff model config "
            f"(format={header.get('format') if isinstance(header, dict) else None!r}, "
            f"expected {MODEL_FORMAT!r}); save models with crossdiff.save_model"
        )
    return header


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> HookedTransformer:
    """Rebuild the model saved in `model_dir` and load its weights (in eval mode)."""
    model_dir = Path(model_dir)
    header = read_model_header(model_dir)
    device = resolve_device(device)
    cfg = config_from_dict(header["config"], device=str(device))
    model = build_model(cfg, **(header.get("moe") or {}))
    load_weights(model, model_dir / WEIGHTS_FILE)
    return model.eval()


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors state dict into `model`, naming every missing, unexpected or
    mis-shaped tensor if it does not fit."""
    if not path.exists():
        raise CrossdiffError(f"model weights not found: {path}")
    advice = f"the file was damaged after it was written; retrain it (delete {path.parent})"
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors has its own error types for a damaged file
        raise CrossdiffError(f"cannot read model weights {path}: {err}; re-create them") from err
    check_state_dict_fits(model, tensors, source=str(path))  # names misfits before a bad sum
    verify_checksum(path, "model weights", advice)
    parameters = dict(model.named_parameters())
    check_finite_tensors(
        {k: v for k, v in tensors.items() if k in parameters}, f"model weights {path}", advice
    )
    model.load_state_dict(tensors, strict=True)


def check_state_dict_fits(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        parts.append(f"shape mismatches: {_clip(wrong)}")
    if missing:
        parts.append(f"missing tensors: {_clip(missing)}")
    if unexpected:
        parts.append(f"unexpected tensors: {_clip(unexpected)}")
    raise CrossdiffError(
        f"the weights in {source} do not fit the model config ({'; '.join(parts)}); they come "
        "from a different config: load them with the config they were saved with, or retrain"
    )


def _clip(items: list[str], n: int = 6) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
