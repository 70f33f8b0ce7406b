"""Whether a crosscoder reads the activations it is given: its cfg.json records the store it was
trained on (fingerprint, hook points, each model's config and weight hashes: provenance.py), and
`diff_features`, `evaluate_crosscoder` and `crossdiff report` compare them with the store they
are given, and the report's tokenizer with the store's. A mismatch is refused, naming what
differs; `allow_mismatch=True` (`--allow-mismatch`) applies it anyway, for a deliberate transfer,
and the differences are then recorded in the results.

Only what was recorded is compared: a crosscoder trained on a tensor or an in-memory store
records no models or hooks, and a tensor given to it has none, so those pass unchecked; one
trained on live activations records their models and hooks but no store to compare with.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from crossdiff.plumbing.common import CrossdiffError


def _metadata(cc: Any) -> dict[str, Any]:
    metadata = getattr(getattr(cc, "cfg", None), "metadata", None)
    if metadata is None:
        return {}
    if hasattr(metadata, "to_dict"):
        return dict(metadata.to_dict())
    return dict(metadata) if isinstance(metadata, dict) else {}


def _manifest(acts: Any) -> dict[str, Any] | None:
    manifest = getattr(acts, "manifest", None)
    return manifest if isinstance(manifest, dict) else None


def crosscoder_mismatches(cc: Any, acts: Any) -> list[str]:
    """What differs between the store `cc` was trained on (its cfg.json) and the store `acts`;
    [] when they agree or when either side records nothing to compare."""
    from crossdiff.plumbing.fingerprint import store_fingerprint

    recorded, manifest = _metadata(cc), _manifest(acts)
    if manifest is None or not recorded.get("hook_points"):
        return []
    found = []
    hooks = {name: list(h) for name, h in manifest.get("hook_points", {}).items()}
    if recorded["hook_points"] != hooks:
        read = recorded["hook_points"]
        found.append(f"hook points: the crosscoder read {read}, the store holds {hooks}")
    theirs = {m["name"]: m for m in manifest.get("models", [])}
    for model in recorded.get("models") or []:
        other = theirs.get(model.get("name"))
        if other is None:
            continue  # a name missing shows in the hook points
        for key in ("config_hash", "weights_hash"):
            if model.get(key) and other.get(key) and model[key] != other[key]:
                found.append(f"model {model['name']!r} {key}: {model[key]} vs {other[key]}")
    fingerprint = recorded.get("store_fingerprint")
    from_store = bool(recorded.get("dataset_path"))  # live-trained: no store to compare with
    if from_store and fingerprint and fingerprint != store_fingerprint(acts):
        trained_on = recorded.get("dataset_path") or "another store"
        found.append(
            f"store fingerprint: trained on {trained_on} ({fingerprint}), given "
            f"{getattr(acts, 'path', 'a store')} ({store_fingerprint(acts)}): other tokens, or "
            "a store changed since (extended, manifest edited)"
        )
    return found


def tokenizer_fingerprints(tokenizer: Any) -> set[str]:
    """The fingerprints a tokenizer may be recorded under (crossdiff's own, and the vocabulary
    hash a harvest of a model with a Hugging Face tokenizer records: activations/identity.py)."""
    from crossdiff.activations.identity import vocab_fingerprint

    prints = {str(getattr(tokenizer, "fingerprint", None) or "")}
    backend = getattr(tokenizer, "tokenizer", None)  # a CrossdiffTokenizer's `tokenizers` one
    for candidate in (tokenizer, backend):
        if candidate is not None and hasattr(candidate, "get_vocab"):
            plain = SimpleNamespace(get_vocab=candidate.get_vocab)
            prints.add(str(vocab_fingerprint(SimpleNamespace(tokenizer=plain)) or ""))
    return prints - {""}


def tokenizer_mismatch(tokenizer: Any, acts: Any) -> str | None:
    """How `tokenizer` differs from the one the store's tokens were made with, or None."""
    manifest = _manifest(acts)
    if tokenizer is None or manifest is None:
        return None
    recorded = (manifest.get("tokenizer") or {}).get("fingerprint")
    if not recorded:
        return None
    prints = tokenizer_fingerprints(tokenizer)
    if not prints or recorded in prints:
        return None
    name = (manifest.get("tokenizer") or {}).get("name")
    return (
        f"tokenizer: the store's tokens were made with {name!r} (fingerprint {recorded}), the "
        f"tokenizer given is {getattr(tokenizer, 'name', type(tokenizer).__name__)!r} "
        f"(fingerprint {sorted(prints)[0]}), so its contexts would decode to other text"
    )


def resolve_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object for `tokenizer`: a path or Hugging Face name is loaded
    (crossdiff.data.load_tokenizer, which says clearly when it cannot be)."""
    from pathlib import PurePath

    if not isinstance(tokenizer, str | PurePath):
        return tokenizer  # None, or a tokenizer object
    from crossdiff.data import load_tokenizer

    return load_tokenizer(tokenizer)


def check_reads(
    cc: Any, acts: Any, *, tokenizer: Any = None, allow_mismatch: bool = False, where: str
) -> list[str]:
    """Refuse (CrossdiffError) a crosscoder or tokenizer that does not match the store `acts`,
    unless `allow_mismatch`; the differences found (to record in the results)."""
    found = crosscoder_mismatches(cc, acts)
    about_tokenizer = tokenizer_mismatch(tokenizer, acts)
    if about_tokenizer:
        found.append(about_tokenizer)
    if found and not allow_mismatch:
        raise CrossdiffError(
            f"{where}: the crosscoder or tokenizer does not match the store "
            f"{getattr(acts, 'path', '')}: " + "; ".join(found) + ". Its numbers would describe "
            "another model pair's activations (or decode other text). Give the store it was "
            "trained on (and that store's tokenizer), or pass allow_mismatch=True "
            "(--allow-mismatch) for a deliberate transfer; the differences are then recorded"
        )
    return found
