"""Fingerprints: short hashes that say whether a result was made from the inputs and the
configuration asked for now (the rule is in docs/architecture.md, "Fingerprints").

A fingerprint is the first 16 hex digits of a sha256. Configurations are hashed as canonical
JSON; folders by their files' bytes, except where a manifest already holds the checksums of the
big files (an activation store), so a fingerprint costs one pass over what a stage wrote, once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# folders inside a stage that are its working state, not its result
_WORK_DIRS = ("checkpoints", "checkpoint")
# files a stage folder holds about itself (records, locks, temporary files)
_RECORD_FILES = ("stage.json", "run.lock")


def canonical(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def fingerprint(obj: Any) -> str:
    """The fingerprint of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hash_file(digest: Any, path: Path, chunk: int = 1 << 22, also: Any = None) -> None:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if also is not None:
                also.update(block)


def tensor_fingerprint(tensor: Tensor) -> str:
    """The fingerprint of a tensor's shape, dtype and values."""
    digest = hashlib.sha256(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
    flat = tensor.detach().reshape(-1)
    for part in flat.split(1 << 22):
        digest.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def store_fingerprint(store: Any) -> str:
    """The fingerprint of an activation store's content.

    An on-disk store is fingerprinted by its manifest, which holds the sha256 of every shard and
    statistics file (reading the manifest is cheap; the shards are not re-read). An in-memory
    store or a tensor is fingerprinted by its values."""
    if isinstance(store, Tensor):
        return tensor_fingerprint(store)
    path = getattr(store, "path", None)
    if path is not None and (Path(path) / "manifest.json").exists():
        return _manifest_fingerprint(Path(path))
    acts = getattr(store, "acts", None)
    if isinstance(acts, Tensor):
        return tensor_fingerprint(acts)
    own = getattr(store, "fingerprint", None)  # a live source names its own inputs
    if isinstance(own, str):
        return own
    factors = getattr(store, "scaling_factors", None)
    described = {
        "type": type(store).__name__,
        "n_tokens": getattr(store, "n_tokens", None),
        "n_models": getattr(store, "n_models", None),
        "d_model": getattr(store, "d_model", None),
        "scaling_factors": [] if factors is None else [float(v) for v in factors],
    }
    return fingerprint(described)


def _manifest_fingerprint(folder: Path) -> str:
    return fingerprint(json.loads((folder / "manifest.json").read_text()))


def folder_fingerprint(folder: Path) -> str:
    """The fingerprint of what a stage wrote into `folder`: every file's path and bytes, except
    its working state (checkpoints), its own records and temporary files. A store folder is
    fingerprinted by its manifest (see `store_fingerprint`)."""
    return folder_digests(folder)[0]


def folder_digests(folder: Path) -> tuple[str, dict[str, str]]:
    """(`folder_fingerprint(folder)`, {file path: the first 16 hex digits of its sha256}) in one
    pass over the files: the map names the files that changed when the fingerprint does. A store
    folder's map holds its manifest only (the manifest holds every shard's sha256)."""
    folder = Path(folder)
    if (folder / "manifest.json").exists():
        manifest = folder / "manifest.json"
        return _manifest_fingerprint(folder), {"manifest.json": _file_digest(manifest)}
    digest = hashlib.sha256()
    files: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (
            not path.is_file()
            or rel.parts[0] in _WORK_DIRS
            or rel.name in _RECORD_FILES
            or any(part.startswith(".") for part in rel.parts)
        ):
            continue
        own = hashlib.sha256()
        digest.update(rel.as_posix().encode() + b"\0")
        _hash_file(digest, path, also=own)
        digest.update(b"\0")
        files[rel.as_posix()] = own.hexdigest()[:16]
    return digest.hexdigest()[:16], files


def _file_digest(path: Path) -> str:
    own = hashlib.sha256()
    _hash_file(own, path)
    return own.hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        flat: dict[str, Any] = {}
        for key, value in obj.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): obj}


def changes(before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (before, after)} for every leaf that differs between two JSON-able dicts."""
    old, new = _flatten(canonical(before)), _flatten(canonical(after))
    return {
        k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    }


def describe_changes(before: Any, after: Any, limit: int = 8) -> str:
    """'k: 8 -> 16, n_tokens: 12000 -> 9000' (at most `limit` items)."""
    diff = changes(before, after)
    items = [f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in diff.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else "nothing"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
