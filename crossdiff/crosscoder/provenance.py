"""What a crosscoder reads, written into its cfg.json `metadata` by `train_crosscoder`.

From an on-disk store's manifest: per model its name, hooks and weight/config hashes, its class
and Hugging Face id or local folder's fingerprint (`model_sources`), the store's fingerprint and
folder name, the tokenizer and the token set's fingerprint; and the SAELens 6 `SAEMetadata` fields
these fill (model_name, model_class_name, hook_name, dataset_path, context_size, prepend_bos,
seqpos_slice). `dataset_path` is `crossdiff-store:<store fingerprint>`, the same on every machine
(never a local path). A tensor or an in-memory store gives what it has: the fingerprint of its
values and its model names. Every crosscoder records the versions of crossdiff, torch,
TransformerLens and SAELens it was trained with. docs/crosscoder.md#provenance lists the keys.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import Any

from crossdiff.plumbing.fingerprint import store_fingerprint

STORE_SCHEME = "crossdiff-store:"  # dataset_path = STORE_SCHEME + the store's fingerprint
_PACKAGES = {
    "crossdiff": "crossdiff",
    "torch": "torch",
    "transformer_lens": "transformer-lens",
    "sae_lens": "sae-lens",
}


def versions() -> dict[str, str | None]:
    """The installed versions of the packages a crosscoder's numbers depend on."""
    out: dict[str, str | None] = {}
    for key, dist in _PACKAGES.items():
        try:
            out[key] = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            out[key] = None
    if out["crossdiff"] is None:  # run from a source tree that is not installed
        import crossdiff

        out["crossdiff"] = crossdiff.__version__
    return out


def store_provenance(acts: Any) -> dict[str, Any]:
    """The provenance keys for `acts` (an ActivationStore, an in-memory store or a tensor)."""
    fingerprint = store_fingerprint(acts)
    provenance: dict[str, Any] = {"store_fingerprint": fingerprint, "versions": versions()}
    names = getattr(acts, "model_names", None)
    if names is not None:
        provenance["model_names"] = [str(n) for n in names]
    manifest = getattr(acts, "manifest", None)
    header = getattr(acts, "manifest_header", None)  # live activations: no folder, no shards
    if not isinstance(manifest, dict) and isinstance(header, dict):
        hooks = {name: list(h) for name, h in header.get("hook_points", {}).items()}
        provenance["hook_points"] = hooks
        provenance["models"] = [
            {**model, "hook_names": hooks.get(model["name"], [])}
            for model in header.get("models", [])
        ]
        return provenance
    if not isinstance(manifest, dict):
        return provenance
    names = list(manifest["model_names"])
    hooks = {name: list(h) for name, h in manifest["hook_points"].items()}
    tokenizer = dict(manifest.get("tokenizer") or {})
    segments = manifest.get("segments") or [{}]
    pairing = manifest.get("pairing") or {}
    drop_bos = bool(pairing.get("drop_bos", True))
    sources = list(manifest.get("model_sources") or [])
    classes = list(dict.fromkeys(str(s.get("class")) for s in sources))
    provenance.update(
        {
            "model_names": names,
            "hook_points": hooks,
            "models": [
                {**model, "hook_names": hooks.get(model["name"], [])}
                for model in manifest.get("models", [])
            ],
            "pairing": pairing.get("name"),
            "tokenizer_name": tokenizer.get("name"),
            "tokenizer_fingerprint": tokenizer.get("fingerprint"),
            "token_set_fingerprints": [s["token_set"] for s in segments if "token_set" in s],
            "model_sources": sources,  # per model: class, hf_id or folder_name + fingerprint
            "store_name": acts.path.name,
            # SAELens 6 SAEMetadata fields (one model and one hook per SAE there)
            "model_name": "+".join(names),
            # one class, or "A+B" for two; a store harvested before model_sources: unknown
            "model_class_name": "+".join(classes) if classes else None,
            "hook_name": _common_hook(hooks),
            "dataset_path": STORE_SCHEME + fingerprint,
            "context_size": segments[0].get("seq_len"),
            # crossdiff token rows start with BOS; a pairing that drops it skips position 0
            "prepend_bos": True,
            "seqpos_slice": [1, None] if drop_bos else [None],
        }
    )
    return provenance


def _common_hook(hooks: dict[str, list[str]]) -> str | None:
    """The hook every model reads when it is one and the same; None otherwise (per-model hooks
    are in `hook_points`)."""
    distinct = {tuple(h) for h in hooks.values()}
    if len(distinct) == 1:
        (only,) = distinct
        if len(only) == 1:
            return only[0]
    return None


def record_provenance(metadata: Any, acts: Any) -> None:
    """Write `store_provenance(acts)` into a SAEMetadata (or dict); keys set already stay."""
    for key, value in store_provenance(acts).items():
        if metadata.get(key) is None:
            metadata[key] = value
