"""ActivationSource: the one data contract between the activations, crosscoder and analysis stages.

Paired activations [n_tokens, n_models, d_model] (models of smaller width zero-padded to d_model)
with per-token metadata, readable in order (`read_acts`, `read_metadata`) and as training batches
(`iter_batches`). What implements it:

    ActivationStore            a store on disk (store.py), and any part of it: store.part("heldout")
    LiveActivations            the training part of a harvest, computed on demand (live.py)
    InMemoryStore              activations in a tensor (crosscoder/synthetic.py)

Training reads `iter_batches` and `scaling_factors`; evaluation and analysis read `read_acts`
and `read_metadata` (whose keys are a subset of layout.METADATA_KEYS: a source without metadata
returns an empty dict).

`isinstance(x, ActivationSource)` works (runtime_checkable), but on Python 3.11 it reads every
member, and a live source's `scaling_factors` runs the models on its first shards: check types
statically, or with isinstance only where that cost is acceptable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor


@runtime_checkable
class ActivationSource(Protocol):
    """Paired activations and per-token metadata (see the module's docstring)."""

    @property
    def n_tokens(self) -> int:
        """Tokens this source reads (a store's view: the whole store or one part)."""
        ...

    @property
    def n_models(self) -> int: ...

    @property
    def d_model(self) -> int:
        """The stored width: the largest of d_models."""
        ...

    @property
    def d_models(self) -> Sequence[int]:
        """Each model's own width."""
        ...

    @property
    def model_names(self) -> Sequence[str]: ...

    @property
    def domain_names(self) -> Sequence[str]:
        """Names of the `domains` metadata indices (empty when the tokens have no domains)."""
        ...

    @property
    def scaling_factors(self) -> Float[Tensor, " n_models"]:
        """Multiply model m's raw activations by factor m to bring their mean norm to sqrt(d_m)."""
        ...

    def iter_batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        normalize: bool = True,
        loop: bool = True,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Iterator[Float[Tensor, "batch n_models d_model"]]:
        """Full training batches (scaled when normalize), shuffled by `seed`; forever when loop."""
        ...

    def read_acts(
        self, start: int = 0, stop: int | None = None, normalize: bool = False
    ) -> Float[Tensor, "n n_models d_model"]:
        """Activations of tokens [start, stop) in the source's order (raw unless normalize)."""
        ...

    def read_metadata(self, start: int = 0, stop: int | None = None) -> dict[str, Tensor]:
        """Per-token metadata of tokens [start, stop), int64, keyed by layout.METADATA_KEYS."""
        ...
