"""One view over the tokens an analysis reads: an in-memory tensor or an ActivationSource (an
on-disk ActivationStore or a part of it, an InMemoryStore, ...)."""

from __future__ import annotations

import torch
from torch import Tensor

from crossdiff.activations.source import ActivationSource
from crossdiff.activations.store_layout import METADATA_KEYS
from crossdiff.plumbing.common import CrossdiffError

DEFAULT_MODEL_NAMES = ("dense", "moe")
DEFAULT_DOMAIN_NAMES = ("code", "science", "stories")


class TokenSource:
    """Raw activations [n, n_models, d] and per-token metadata, read by store index."""

    def __init__(
        self,
        acts_or_store: ActivationSource | Tensor,
        metadata: dict[str, Tensor] | None = None,
        model_names: tuple[str, ...] | list[str] | None = None,
        domain_names: tuple[str, ...] | list[str] | None = None,
    ) -> None:
        if isinstance(acts_or_store, Tensor):
            self._init_tensor(acts_or_store, metadata)
            store_models, store_domains = None, None
        elif hasattr(acts_or_store, "read_acts") and hasattr(acts_or_store, "n_tokens"):
            if metadata is not None:
                raise CrossdiffError(
                    "metadata= is only for in-memory activations; a store has its own metadata. "
                    "Pass the store alone."
                )
            self.store = acts_or_store
            self.acts = None
            self.metadata: dict[str, Tensor] = {}
            self.n_tokens = int(acts_or_store.n_tokens)
            self.n_models = int(acts_or_store.n_models)
            self.manifest = dict(getattr(acts_or_store, "manifest", {}) or {})
            store_models = tuple(getattr(acts_or_store, "model_names", ()) or ()) or None
            # a store's own list, empty when it recorded none (a plain token tensor's harvest)
            store_domains = getattr(acts_or_store, "domain_names", None)
            store_domains = None if store_domains is None else tuple(store_domains)
            probe = acts_or_store.read_metadata(0, min(1, self.n_tokens)) if self.n_tokens else {}
            self.metadata_keys = tuple(k for k in METADATA_KEYS if k in probe)
        else:
            raise CrossdiffError(
                f"expected activations as a Tensor [n_tokens, n_models, d_model] or an "
                f"ActivationStore, got {type(acts_or_store).__name__}"
            )
        if self.n_tokens == 0:
            raise CrossdiffError("there are no tokens to analyse; harvest some activations first")
        names = model_names or store_models or DEFAULT_MODEL_NAMES[: self.n_models]
        self.model_names = tuple(str(n) for n in names)
        if len(self.model_names) != self.n_models:
            raise CrossdiffError(
                f"{len(self.model_names)} model names {self.model_names} for {self.n_models} "
                "models in the activations; pass one name per model"
            )
        if domain_names:
            self.domain_names = tuple(domain_names)
        elif store_domains is not None:
            self.domain_names = store_domains
        else:
            self.domain_names = DEFAULT_DOMAIN_NAMES

    def _init_tensor(self, acts: Tensor, metadata: dict[str, Tensor] | None) -> None:
        if acts.ndim != 3:
            raise CrossdiffError(
                f"activations must be [n_tokens, n_models, d_model], got shape {tuple(acts.shape)}"
            )
        self.store = None
        self.acts = acts
        self.n_tokens, self.n_models = int(acts.shape[0]), int(acts.shape[1])
        self.manifest = {}
        self.metadata = {}
        for key, value in (metadata or {}).items():
            if key not in METADATA_KEYS:
                continue
            value = torch.as_tensor(value)
            if value.shape[0] != self.n_tokens:
                raise CrossdiffError(
                    f"metadata[{key!r}] has {value.shape[0]} rows but there are {self.n_tokens} "
                    "tokens; give one entry per token"
                )
            if key == "experts" and value.ndim == 1:
                value = value[:, None]
            self.metadata[key] = value
        self.metadata_keys = tuple(self.metadata)

    def read_acts(self, start: int, stop: int) -> Tensor:
        if self.acts is not None:
            return self.acts[start:stop]
        return self.store.read_acts(start, stop, normalize=False)

    def read_metadata(self, start: int, stop: int) -> dict[str, Tensor]:
        if self.acts is not None:
            return {k: v[start:stop] for k, v in self.metadata.items()}
        meta = self.store.read_metadata(start, stop)
        return {k: torch.as_tensor(meta[k]) for k in self.metadata_keys}

    def ranges(self, max_tokens: int | None, n_chunks: int = 64) -> list[tuple[int, int]]:
        """Token ranges to analyse: everything, or `max_tokens` spread over evenly spaced chunks

        (contiguous chunks keep context windows intact; spreading them covers every domain even when
        the store is ordered by domain).
        """
        if max_tokens is None or max_tokens >= self.n_tokens:
            return [(0, self.n_tokens)]
        if max_tokens <= 0:
            raise CrossdiffError(f"max_tokens must be positive, got {max_tokens}")
        n_chunks = max(1, min(n_chunks, max_tokens))
        stride = self.n_tokens // n_chunks
        size = max_tokens // n_chunks
        out = [(i * stride, i * stride + size) for i in range(n_chunks)]
        extra = max_tokens - size * n_chunks
        if extra:
            start, stop = out[-1]
            out[-1] = (start, min(self.n_tokens, stop + extra))
        return out
