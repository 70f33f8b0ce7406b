"""JointSource: the models of several paired sources, side by side, as one ActivationSource.

`crossdiff run --model-seeds N` harvests N pairs (dense_i, moe_i) on the same tokens in the same
order; one crosscoder over all 2N models' activations then decides per latent which models it
writes to (crossdiff.analysis.attribution). A JointSource reads the same token of every source at
once and lays the chosen models of each side by side on the model axis, zero-padding narrower
widths to the widest. Training reads every source's batches with one seed (two readers with the
same seed and layout yield the same rows), so the sources must hold the same tokens in the same
shard layout: the constructor checks the token ids of every source against the first's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from crossdiff.activations.source import ActivationSource
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.distributed import DistInfo


class JointSource(ActivationSource):
    """columns: (source, model index in that source) per model of the joint source, in order."""

    drops_partial_batch = True

    def __init__(self, columns: Sequence[tuple[ActivationSource, int]]) -> None:
        if len(columns) < 2:
            raise CrossdiffError(f"a JointSource needs at least 2 models, got {len(columns)}")
        self.sources: list[ActivationSource] = []
        self.columns: list[tuple[int, int]] = []  # (index into self.sources, model index)
        for source, model in columns:
            if not 0 <= model < source.n_models:
                raise CrossdiffError(
                    f"model {model} of {source.source_label}, which holds {source.n_models}"
                )
            slot = next((i for i, s in enumerate(self.sources) if s is source), None)
            if slot is None:
                self.sources.append(source)
                slot = len(self.sources) - 1
            self.columns.append((slot, model))
        self._check_aligned()
        self.n_tokens = int(self.sources[0].n_tokens)
        self.n_models = len(self.columns)
        self.d_models = [int(self.sources[s].d_models[m]) for s, m in self.columns]
        self.d_model = max(self.d_models)
        self.model_names = [str(self.sources[s].model_names[m]) for s, m in self.columns]
        if len(set(self.model_names)) != len(self.model_names):
            raise CrossdiffError(
                f"the joint source's models {self.model_names} repeat a name; name every model "
                "of the paired sources apart (e.g. dense, moe, dense2, moe2)"
            )
        self.domain_names = list(self.sources[0].domain_names)
        self.scaling_factors = torch.stack(
            [self.sources[s].scaling_factors[m].float() for s, m in self.columns]
        )
        self.empty_advice = self.sources[0].empty_advice
        from crossdiff.plumbing.fingerprint import fingerprint, store_fingerprint

        # what the crosscoder stage records as its data: each source's content and the layout
        # (not the part: a store's parts share its fingerprint, so training on the train part
        # and evaluating on the held-out part read "the same store")
        self.fingerprint = fingerprint(
            {"joint": [store_fingerprint(s) for s in self.sources], "columns": self.columns}
        )

    def _check_aligned(self) -> None:
        first = self.sources[0]
        ids = first.read_metadata().get("token_ids")
        for other in self.sources[1:]:
            if other.n_tokens != first.n_tokens:
                raise CrossdiffError(
                    f"{other.source_label} holds {other.n_tokens} tokens and "
                    f"{first.source_label} {first.n_tokens}; a joint source needs sources "
                    "harvested from the same tokens (same token set, n_tokens and split seed)"
                )
            theirs = other.read_metadata().get("token_ids")
            if ids is not None and theirs is not None and not torch.equal(ids, theirs):
                raise CrossdiffError(
                    f"{other.source_label} and {first.source_label} hold other tokens in the "
                    "same places; harvest every pair from the same token set, n_tokens and "
                    "split seed"
                )

    @property
    def source_label(self) -> str:
        return "the joint source of " + ", ".join(s.source_label for s in self.sources)

    def _side_by_side(self, parts: list[Tensor]) -> Tensor:
        n = parts[0].shape[0]
        out = torch.zeros(n, self.n_models, self.d_model, dtype=parts[0].dtype)
        for i, (s, m) in enumerate(self.columns):
            width = self.d_models[i]
            out[:, i, :width] = parts[s][:, m, :width]
        return out

    def read_acts(
        self, start: int = 0, stop: int | None = None, normalize: bool = False
    ) -> Float[Tensor, "n n_models d_model"]:
        parts = [s.read_acts(start, stop, normalize=normalize) for s in self.sources]
        return self._side_by_side([p.float() for p in parts])

    def read_metadata(self, start: int = 0, stop: int | None = None) -> dict[str, Tensor]:
        """The first source's metadata (the sources hold the same tokens); its `experts` are
        those of the first source's MoE."""
        return self.sources[0].read_metadata(start, stop)

    def raw_batches(
        self, batch_size: int, *, seed: int, shuffle: bool, loop: bool, capacity: int,
        chunk_tokens: int, skip: int, part: DistInfo | None,
    ) -> Iterator[Tensor]:  # fmt: skip
        """Every source's batches with the same seed, zipped (they hold the same rows)."""
        readers = [
            s.raw_batches(
                batch_size,
                seed=seed,
                shuffle=shuffle,
                loop=loop,
                capacity=capacity,
                chunk_tokens=chunk_tokens,
                skip=skip,
                part=part,
            )  # fmt: skip
            for s in self.sources
        ]
        for batches in zip(*readers, strict=True):
            yield self._side_by_side([b.float() for b in batches])

    def part(self, name: str) -> JointSource:
        """The joint source over each store's `name` part ('train', 'heldout', 'all')."""
        parts = {id(s): s.part(name) for s in self.sources}  # type: ignore[attr-defined]
        return JointSource([(parts[id(self.sources[s])], m) for s, m in self.columns])


def joint_source(
    stores: Sequence[ActivationSource], order: Sequence[tuple[int, int]] | None = None
) -> JointSource:
    """A JointSource over paired stores: by default every model of every store, store by store;
    `order` lists (store index, model index) to lay the models out otherwise (e.g. every dense
    model first, then every MoE)."""
    if order is None:
        order = [(i, m) for i, s in enumerate(stores) for m in range(s.n_models)]
    return JointSource([(stores[i], m) for i, m in order])
