"""What a crosscoder reads, written into its cfg.json `metadata` by `train_crosscoder`.

From an on-disk store's manifest: per model its name, hooks and weight/config hashes, the store's
fingerprint, the tokenizer and the token set's fingerprint; and the SAELens 6
`SAEMetadata` fields these fill (model_name, model_class_name, hook_name, dataset_path,
context_size, prepend_bos, seqpos_slice). A tensor or an in-memory store gives what it has: the
fingerprint of its values and its model names. docs/crosscoder.md#provenance lists the keys.
"""

from __future__ import annotations

from typing import Any

from crossdiff.fingerprint import store_fingerprint


def store_provenance(acts: Any) -> dict[str, Any]:
    """The provenance keys for `acts` (an ActivationStore, an in-memory store or a tensor)."""
    provenance: dict[str, Any] = {"store_fingerprint": store_fingerprint(acts)}
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
            # SAELens 6 SAEMetadata fields (one model and one hook per SAE there)
            "model_name": "+".join(names),
            "model_class_name": "HookedTransformer",
            "hook_name": _common_hook(hooks),
            "dataset_path": str(acts.path.resolve()),
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
