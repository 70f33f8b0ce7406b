"""Who the two models of a harvest are (their config and weights hashes, their tokenizer) and
the check that they can be paired on a token set (one vocabulary, one tokenizer)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

from crossdiff.integrations.lens import (
    LensModel,  # the models a harvest runs: HookedTransformer or Bridge
)
from crossdiff.plumbing.common import CrossdiffError


def config_hash(model: LensModel) -> str:
    fields = {k: v for k, v in model.cfg.to_dict().items() if k not in ("device", "n_devices")}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_hash(model: LensModel) -> str:
    """A hash of every parameter and buffer, so a resume with other weights is refused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def vocab_fingerprint(model: LensModel) -> str | None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    return tokenizer_fingerprint(tokenizer)


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """One identity for a tokenizer however it reaches crossdiff: a crossdiff tokenizer's own
    fingerprint, and for a Hugging Face fast tokenizer (or a bare `tokenizers.Tokenizer`) the same
    hash of vocabulary and merges, so a TokenSet prepared with `prepare_data(tokenizer=<the
    model's folder>)` matches the model's tokenizer. A slow tokenizer: a hash of its vocabulary."""
    from crossdiff.data.tokenizer import _fingerprint

    if getattr(tokenizer, "fingerprint", None):
        return str(tokenizer.fingerprint)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):
        backend = tokenizer  # a tokenizers.Tokenizer
    if backend is not None:
        return _fingerprint(backend)
    if hasattr(tokenizer, "get_vocab"):
        vocab = sorted(tokenizer.get_vocab().items())
        return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:32]
    return None


def check_tokenizers(
    models: tuple[LensModel, LensModel],
    names: tuple[str, str],
    fingerprints: tuple[str | None, str | None] | None,
    tokens: Tensor,
    token_fingerprint: str | None = None,
) -> None:
    vocab = [m.cfg.d_vocab for m in models]
    if vocab[0] != vocab[1]:
        raise CrossdiffError(
            f"the models have different vocabularies: {names[0]} has d_vocab={vocab[0]}, "
            f"{names[1]} has d_vocab={vocab[1]}. Paired harvesting needs two models that share a "
            "tokenizer; train or load both with the same one"
        )
    given = fingerprints or (None, None)
    prints = [given[i] or vocab_fingerprint(models[i]) for i in range(2)]
    if prints[0] and prints[1] and prints[0] != prints[1]:
        raise CrossdiffError(
            f"the models' tokenizers differ: {names[0]} has fingerprint {prints[0]}, {names[1]} "
            f"has {prints[1]}. The same token ids would mean different text to them; use two "
            "models trained with the same tokenizer"
        )
    model_print = prints[0] or prints[1]
    if token_fingerprint and model_print and token_fingerprint != model_print:
        raise CrossdiffError(
            f"the token set was made with another tokenizer (fingerprint {token_fingerprint}) "
            f"than the models' (fingerprint {model_print}): its ids would mean other text to "
            "them. Use the token set prepared with the models' tokenizer (the data folder the "
            "models were trained from), or prepare-data again with --tokenizer set to it"
        )
    if int(tokens.max()) >= vocab[0]:
        raise CrossdiffError(
            f"the token set has id {int(tokens.max())} but the models' vocabulary has only "
            f"{vocab[0]} ids; was it tokenized with another tokenizer?"
        )
    if int(tokens.min()) < 0:
        raise CrossdiffError(
            f"the token set has the negative id {int(tokens.min())}; token ids run from 0 to "
            f"{vocab[0] - 1}: tokenize the text again"
        )
    check_row_length(models, names, tokens)


def check_row_length(models: tuple[LensModel, ...], names: tuple[str, ...], tokens: Tensor) -> None:
    """Rows the models can read: no longer than either model's context (n_ctx)."""
    for model, name in zip(models, names, strict=True):
        n_ctx = getattr(model.cfg, "n_ctx", None)
        if n_ctx is not None and tokens.shape[-1] > int(n_ctx):
            raise CrossdiffError(
                f"the token rows have {tokens.shape[-1]} tokens but model {name!r} reads at most "
                f"n_ctx={int(n_ctx)}; cut the rows to {int(n_ctx)} tokens (e.g. "
                f"tokens[:, :{int(n_ctx)}]) or pack the token set with seq_len <= {int(n_ctx)}"
            )


def tokenizer_info(
    tokenizer: Any,
    models: tuple[LensModel, ...],
    fingerprints: Any,
    token_set_fingerprint: str | None = None,
) -> dict[str, Any]:
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None and fingerprints:
        fingerprint = fingerprints[0] or fingerprints[1]
    if fingerprint is None:
        fingerprint = vocab_fingerprint(models[0])
    if fingerprint is None:  # the token set's (checked against the models' when they have one)
        fingerprint = token_set_fingerprint
    return {
        "name": getattr(tokenizer, "name", None)
        or getattr(models[0].cfg, "tokenizer_name", None)
        or _hf_tokenizer_name(models),
        "fingerprint": fingerprint,
        "vocab_size": int(models[0].cfg.d_vocab),
    }


def _hf_tokenizer_name(models: tuple[LensModel, ...]) -> str | None:
    """A model's Hugging Face tokenizer's hub id, or its local folder's name (not the path)."""
    from pathlib import Path

    for model in models:
        name = getattr(getattr(model, "tokenizer", None), "name_or_path", None)
        if name:
            return Path(name).name if Path(name).is_dir() else str(name)
    return None
