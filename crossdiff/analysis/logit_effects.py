"""Logit effects of a latent: its decoder vector through each model's final norm and unembedding.

Only meaningful where the crosscoder reads the residual stream (one `hook_resid_*` hook per
model): there a decoder vector d is a direction the model's later layers and unembedding read,
and W_U . d (after the final norm's centering and weights) says which next tokens the latent
promotes and suppresses, directly (SAEDashboard's and Neuronpedia's "logit effects"; the path
through later blocks is ignored, as it is there).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.plumbing.common import CrossdiffError

# a TransformerBridge's own names for the residual stream: blocks.{L}.hook_in (resid_pre), hook_out
_RESID = re.compile(
    r"^(blocks\.\d+\.hook_resid_(pre|mid|post)|blocks\.\d+\.hook_(in|out)|ln_final\.hook_normalized)$"
)


def is_residual_hook(hook: str) -> bool:
    return bool(_RESID.match(hook))


def residual_models(manifest: dict[str, Any], model_names: list[str]) -> dict[str, str]:
    """name -> hook for the models whose single hook point is on the residual stream."""
    points = (manifest or {}).get("hook_points") or {}
    out = {}
    for name in model_names:
        hooks = list(points.get(name) or [])
        if len(hooks) == 1 and is_residual_hook(hooks[0]):
            out[name] = hooks[0]
    return out


def unembed_directions(
    model: Any, directions: Float[Tensor, "n d_model"]
) -> Float[Tensor, "n d_vocab"]:
    """W_U . LN_final(d) to first order: centred (LayerNorm / LNPre), times the norm's weights."""
    d = directions.to(device=model.W_U.device, dtype=model.W_U.dtype)
    kind = getattr(model.cfg, "normalization_type", None)
    if kind in ("LN", "LNPre"):
        d = d - d.mean(-1, keepdim=True)
    weight = getattr(getattr(model, "ln_final", None), "w", None)
    if isinstance(weight, Tensor):
        d = d * weight
    return d @ model.W_U


def logit_effects(
    w_dec: Float[Tensor, "d_sae n_models d_model"],
    latents: list[int],
    models: dict[str, Any],
    model_names: list[str],
    *,
    tokenizer: Any = None,
    k: int = 10,
    batch: int = 256,
) -> dict[int, dict[str, dict[str, list[list[Any]]]]]:
    """latent -> model name -> {"top": [[token, effect], ...], "bottom": [...]} (k each).

    `models`: name -> HookedTransformer, only for the models whose hook is on the residual
    stream (see `residual_models`). Effects use the decoder vector in raw activation units.
    """
    from crossdiff.analysis.contexts import _token_text

    out: dict[int, dict[str, dict[str, list[list[Any]]]]] = {j: {} for j in latents}
    if not latents:
        return out
    for name, model in models.items():
        if name not in model_names:
            raise CrossdiffError(f"model {name!r} is not one of the crosscoder's {model_names}")
        m = model_names.index(name)
        width = int(model.cfg.d_model)
        if width > w_dec.shape[-1]:
            raise CrossdiffError(
                f"model {name!r} has d_model {width} but the crosscoder's vectors have "
                f"{w_dec.shape[-1]}; pass the models the store was harvested from"
            )
        kk = min(k, int(model.cfg.d_vocab_out))
        with torch.no_grad():
            for i in range(0, len(latents), batch):
                ids = latents[i : i + batch]
                d = w_dec[torch.as_tensor(ids), m, :width].float()
                eff = unembed_directions(model, d).float().cpu()
                top_v, top_i = eff.topk(kk, dim=-1)
                bot_v, bot_i = (-eff).topk(kk, dim=-1)
                for row, j in enumerate(ids):
                    out[j][name] = {
                        "top": [[_token_text(tokenizer, int(t)), round(float(v), 4)]
                                for t, v in zip(top_i[row], top_v[row], strict=True)],
                        "bottom": [[_token_text(tokenizer, int(t)), round(-float(v), 4)]
                                   for t, v in zip(bot_i[row], bot_v[row], strict=True)],
                    }  # fmt: skip
    return out


def load_residual_models(
    models: dict[str, Any] | str | Path | None, manifest: dict[str, Any], model_names: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """(name -> model, name -> hook) for the residual-stream models among `models`.

    `models` is a dict of loaded models or model folders by store model name, or a folder with
    one model folder per store model name (the layout `crossdiff run` writes); a folder is a
    crossdiff model or a Hugging Face checkpoint (crossdiff/models/by_name.py). Models whose folder
    is missing are skipped.
    """
    from crossdiff.models.by_name import resolve_models

    hooks = residual_models(manifest, model_names)
    if models is None or not hooks:
        return {}, hooks
    from crossdiff.activations.identity import weights_hash

    loaded = resolve_models(models, model_names, "cpu", only=list(hooks))
    recorded = {m.get("name"): m.get("weights_hash") for m in manifest.get("models", [])}
    for name, model in loaded.items():
        if recorded.get(name) and weights_hash(model) != recorded[name]:
            raise CrossdiffError(
                f"the model given for {name!r} is not the one the store was harvested from (its "
                "weights hash differs from the manifest's), so its logit effects would describe "
                "another model; pass the models of the same run (--models)"
            )
    missing = [name for name in hooks if name not in loaded]
    if missing:
        where = (
            ", ".join(missing)
            if isinstance(models, dict)
            else ", ".join(str(Path(models) / n) for n in missing)
        )
        print(
            f"logit effects: no model for {where}, so the report has no logit effects for "
            f"{', '.join(missing)} (pass --models with the store's models)"
        )
    return loaded, hooks
