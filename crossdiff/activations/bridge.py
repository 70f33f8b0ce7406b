"""What crossdiff needs to know about a TransformerBridge (TransformerLens's wrapper around a
Hugging Face model) beyond its hook names: where its MoE layers' routing can be read, and which
model (class, Hugging Face id or local folder) it is.

A Bridge runs Hugging Face's own MoE modules, which have no `hook_expert_indices`. Its router's
output is hooked instead: `blocks.{L}.mlp.gate.hook_out` (Mixtral, OLMoE, Qwen-MoE, ...: the
router logits, [batch*pos, n_experts]) or `blocks.{L}.mlp.hook_router_scores` (GPT-OSS and the
other blocks that return their scores). The selected experts are the top-k of that row, with k the
model's experts per token: every router these architectures use selects by the top-k of its logits
(softmax and renormalising the top-k weights keep the order), so the ids are the ones the model
routed to. Routers that add a bias or group limit before selecting (DeepSeek-V3 style) are not
covered: pair a hook that outputs the ids there.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

EXPERT_HOOK_RE = re.compile(r"^blocks\.(\d+)\.mlp\.hook_expert_indices$")
# the router outputs of a Bridge's MoE block, in the order they are tried
ROUTER_HOOKS = ("blocks.{L}.mlp.gate.hook_out", "blocks.{L}.mlp.hook_router_scores")
# files of a Hugging Face folder that say which model it is (weights are pinned by weights_hash)
_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def is_bridge(model: Any) -> bool:
    """Whether `model` is a TransformerBridge (by class name: TransformerLens is not imported)."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def experts_per_token(model: Any) -> int | None:
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    for value in (
        getattr(getattr(model, "cfg", None), "experts_per_token", None),
        getattr(hf_config, "num_experts_per_tok", None),
    ):
        if isinstance(value, int) and value > 0:
            return value
    return None


def router_hook(model: Any, expert_hook: str) -> tuple[str, int] | None:
    """(router hook, top_k) to read `blocks.{L}.mlp.hook_expert_indices` from on a Bridge that
    does not have that hook; None when the model has it or has no router there."""
    match = EXPERT_HOOK_RE.match(expert_hook)
    if match is None or not is_bridge(model) or expert_hook in model.hook_dict:
        return None
    top_k = experts_per_token(model)
    if top_k is None:
        return None
    known = model.hook_dict
    for template in ROUTER_HOOKS:
        name = template.format(L=match.group(1))
        if name in known:
            return name, top_k
    return None


def model_source(model: Any) -> dict[str, Any]:
    """Which model this is: its class, and its Hugging Face id or local folder's fingerprint."""
    out: dict[str, Any] = {"class": type(model).__name__}
    name_or_path = None
    original = getattr(model, "original_model", None)  # a Bridge's Hugging Face model
    if original is not None:
        name_or_path = getattr(getattr(original, "config", None), "_name_or_path", None) or None
    cfg = getattr(model, "cfg", None)
    if name_or_path is None and is_bridge(model):
        name_or_path = getattr(cfg, "model_name", None)
    if name_or_path and Path(str(name_or_path)).is_dir():
        folder = Path(str(name_or_path))
        out["folder_name"] = folder.name
        out["folder_fingerprint"] = folder_fingerprint(folder)
    elif name_or_path:
        out["hf_id"] = str(name_or_path)
    elif getattr(cfg, "model_name", None) not in (None, "custom"):
        out["model_name"] = str(cfg.model_name)  # a HookedTransformer.from_pretrained name
    return out


def folder_fingerprint(folder: Path) -> str:
    """sha256 of a Hugging Face folder's config and tokenizer files and its weight files' names
    and sizes: one folder gives one fingerprint on any machine, without reading the weights."""
    digest = hashlib.sha256()
    for name in _FOLDER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{path.name}\0{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]
