"""A float32 ActivationStore written from a planted tensor, for tests that need a store on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crossdiff.activations import ActivationStore
from crossdiff.activations.store import FORMAT, FORMAT_VERSION, StoreWriter


def write_planted_store(
    path: Path, acts: torch.Tensor, *, shard: int = 256, **header_keys: Any
) -> ActivationStore:
    """`acts` [n, 2, d_model] as a store of two models ("dense", "moe") in shards of `shard`
    tokens, one document; `header_keys` replace or add header fields (hooks, model hashes...)."""
    d_model = int(acts.shape[-1])
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_names": ["dense", "moe"],
        "hook_points": {"dense": ["h"], "moe": ["h"]},
        "dtype": "float32",
        "d_model": d_model,
        "d_models": [d_model, d_model],
        "experts": {"model": None, "hooks": [], "width": 1},
        "domain_names": ["code"],
        "segments": [{"token_set": "planted", "start": 0, "n_tokens": 0}],
        **header_keys,
    }
    writer = StoreWriter.create(path, header)
    for lo in range(0, len(acts), shard):
        hi = min(lo + shard, len(acts))
        writer.write_shard(
            {
                "acts": acts[lo:hi],
                "token_ids": torch.arange(lo, hi, dtype=torch.int32),
                "doc_ids": torch.zeros(hi - lo, dtype=torch.int64),
                "positions": torch.arange(lo, hi, dtype=torch.int32),
                "domains": torch.zeros(hi - lo, dtype=torch.int16),
                "experts": torch.full((hi - lo, 1), -1, dtype=torch.int16),
            }
        )
    return ActivationStore(path)
