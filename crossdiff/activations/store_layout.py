"""The activation store's layout on disk: its file names, the manifest's fields and checks, and
which files of a folder belong to a store (so a harvest may remove or reuse them).

Layout (format in docs/store.md):
    manifest.json               models, hooks, pairing, dtype, shards with token counts and sha256
    shard_NNNNN.safetensors     acts [n, n_models, d] and token_ids, doc_ids, positions, domains,
                                experts [n, width] per token
    stats_NNNNN.safetensors     float64 running sums after NNNNN shards (norms, mean/std per dim)
    ranks-of-N/rank_R/          a harvest by N processes: each rank's own store (same layout),
                                with ranks-of-N/plan.json; the top-level manifest names their
                                shards by relative path
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossdiff.activations.pairing import hook_layer
from crossdiff.plumbing.common import CrossdiffError

FORMAT = "crossdiff.ActivationStore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# the per-token metadata a store keeps beside the activations (read_metadata's keys)
METADATA_KEYS = ("token_ids", "doc_ids", "positions", "domains", "experts")
PARTS = ("train", "heldout")
# A store's shard and statistics files, and the temporary files they are written through
# (common.atomic_path: ".NAME.<random>.tmp"); group `tmp` is set for a temporary file.
STORE_FILE_RE = re.compile(r"^(?P<tmp>\.)?(?:shard|stats)_\d{5}\.safetensors(?(tmp)\.[^/]*\.tmp)$")
# a harvest by N processes keeps the ranks' own stores in ranks-of-N/rank_R/, with plan.json
RANKS_DIR_RE = re.compile(r"^ranks-of-(\d+)$")
PLAN = "plan.json"
# manifest keys that must match for a harvest to continue an existing store
COMPATIBLE_KEYS = (
    "model_names",
    "models",
    "hook_points",
    "pairing",
    "dtype",
    "d_models",
    "experts",
    "split",
)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def stats_name(n_shards: int) -> str:
    return f"stats_{n_shards:05d}.safetensors"


def is_store_file(name: str, *, temporary: bool = False) -> bool:
    """Whether `name` is a shard or statistics file (with temporary=True: or one being written)."""
    match = STORE_FILE_RE.match(name)
    return bool(match) and (temporary or match["tmp"] is None)


def is_store_entry(p: Path) -> bool:
    """A file or folder a harvest writes into its store folder (so may remove or reuse)."""
    if p.is_dir():
        return bool(RANKS_DIR_RE.match(p.name))
    return p.name == MANIFEST or is_store_file(p.name, temporary=True)


def mask_ranges(mask: Tensor) -> list[list[int]]:
    """The [lo, hi) runs of True in a 1-D bool mask."""
    zero = torch.zeros(1, dtype=torch.int8)
    padded = torch.cat([zero, mask.to(torch.int8), zero])
    edges = torch.diff(padded)
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return [[lo, hi] for lo, hi in zip(starts, stops, strict=True)]


def part_counts(shards: list[dict[str, Any]]) -> dict[str, int]:
    """Tokens per part over manifest shard entries (a shard without `heldout` is all training)."""
    heldout = sum(hi - lo for s in shards for lo, hi in s.get("heldout", []))
    total = sum(int(s["n_tokens"]) for s in shards)
    return {"train": total - heldout, "heldout": heldout}


def expert_column_map(
    hooks: list[str] | tuple[str, ...], top_k: list[int], n_experts: int | None
) -> list[dict[str, Any]]:
    """The manifest's `experts.layout`: per expert hook (in the order its columns were written),
    its block index, how many experts it routes among and its columns [start, stop) of the
    per-token `experts` row."""
    if len(hooks) != len(top_k):
        raise CrossdiffError(f"{len(hooks)} expert hooks but {len(top_k)} column counts")
    layout, start = [], 0
    for hook, k in zip(hooks, top_k, strict=True):
        layer = hook_layer(hook)
        layout.append(
            {
                "hook": hook,
                "layer": layer,
                "n_experts": None if n_experts is None else int(n_experts),
                "columns": [start, start + int(k)],
            }
        )
        start += int(k)
    return layout


def check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The counts and widths in a manifest agree with each other (an edited manifest does not)."""
    advice = "the manifest was edited or damaged: restore it or harvest the store again"
    try:
        shards = manifest["shards"]
        n_tokens = int(manifest["n_tokens"])
        d_models = [int(d) for d in manifest["d_models"]]
        d_model = int(manifest["d_model"])
        n_models = len(manifest["model_names"])
        counts = [int(s["n_tokens"]) for s in shards]
        starts = [int(s["start"]) for s in shards]
    except (KeyError, TypeError, ValueError) as err:
        raise CrossdiffError(f"{path} lacks or mangles a field ({err!r}); {advice}") from err
    if sum(counts) != n_tokens:
        raise CrossdiffError(
            f"{path} says n_tokens={n_tokens} but its shards hold {sum(counts)} tokens; {advice}"
        )
    expected_starts = [sum(counts[:i]) for i in range(len(counts))]
    if starts != expected_starts:
        raise CrossdiffError(
            f"{path} gives shard starts {starts} but the shard sizes make them "
            f"{expected_starts}; {advice}"
        )
    if len(d_models) != n_models or (d_models and d_model != max(d_models)):
        raise CrossdiffError(
            f"{path} says d_model={d_model} with d_models={d_models} for {n_models} models; "
            f"d_model must be the largest of d_models, one per model; {advice}"
        )


def incompatible_keys(manifest: dict[str, Any], header: dict[str, Any]) -> list[str]:
    """The COMPATIBLE_KEYS where a store and a new harvest differ. A store written before
    `experts.layout` existed continues when its expert hooks and width are the same."""
    differ = []
    for key in COMPATIBLE_KEYS:
        stored, new = manifest.get(key), header.get(key)
        old_experts = key == "experts" and isinstance(stored, dict) and "layout" not in stored
        if old_experts and isinstance(new, dict):
            new = {k: v for k, v in new.items() if k != "layout"}
        if stored != new:
            differ.append(key)
    return differ
