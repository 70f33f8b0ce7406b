"""Checks that keep damaged inputs from turning into silent wrong results.

- Checksums: every weight file crossdiff writes gets a `<file>.sha256` beside it (the format of
  `sha256sum`, so `sha256sum -c model.safetensors.sha256` checks it too); a crosscoder training
  checkpoint records it in its state.json instead. Loading verifies it and names the file and
  what to do when it does not match. A file written by an older crossdiff has
  no checksum: it loads unverified, and crossdiff says so once per file. (Hand-written: neither
  safetensors nor huggingface_hub keeps a checksum beside a local file; hashlib does the hashing.)
- Finite checks: weights and activations with NaN or infinity are refused, with where they are
  (tensor and index; for a store the shard file and row).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossdiff.plumbing.common import CrossdiffError, atomic_path

CHECKSUM_SUFFIX = ".sha256"
_warned_unverified: set[str] = set()


def sha256_of_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, hex (hashlib.file_digest reads it in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: str | Path, digest: str | None = None) -> Path:
    """Write `<path>.sha256` for the file at `path` (hashing it unless `digest` is given)."""
    path = Path(path)
    digest = digest or sha256_of_file(path)
    with atomic_path(checksum_path(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")
    return checksum_path(path)


def read_checksum(path: str | Path) -> str | None:
    """The recorded sha256 of `path`, or None if it has no checksum file."""
    sidecar = checksum_path(path)
    if not sidecar.exists():
        return None
    fields = sidecar.read_text().split()
    if not fields or len(fields[0]) != 64:
        raise CrossdiffError(
            f"the checksum file {sidecar} is damaged (expected '<sha256>  {Path(path).name}'); "
            f"delete it to load {Path(path).name} unverified, or re-create both"
        )
    return fields[0].lower()


def verify_checksum(
    path: str | Path, what: str, advice: str, *, expected: str | None = None, recorded_in: str = ""
) -> bool:
    """Check `path` against its `.sha256` file (or the `expected` digest, recorded in the file
    named by `recorded_in`). True if verified; False (said once) if there is no checksum; a
    CrossdiffError naming the file and `advice` if it does not match."""
    path = Path(path)
    if expected is None:
        expected, recorded_in = read_checksum(path), checksum_path(path).name
    if expected is None:
        if str(path) not in _warned_unverified:
            _warned_unverified.add(str(path))
            print(
                f"crossdiff: note: {what} {path} has no checksum file (written by an older "
                "crossdiff); loading it unverified",
                file=sys.stderr,
            )
        return False
    actual = sha256_of_file(path)
    if actual != expected:
        raise CrossdiffError(
            f"{what} {path} is damaged: its sha256 ({actual[:16]}...) does not match the one "
            f"recorded when it was written ({expected[:16]}..., in {recorded_in}); "
            f"{advice}"
        )
    return True


def remove_checksum(path: str | Path) -> None:
    checksum_path(path).unlink(missing_ok=True)


def first_nonfinite(tensor: Tensor) -> tuple[int, ...] | None:
    """Index of the first NaN/inf entry of `tensor`, or None if all are finite."""
    if not tensor.is_floating_point():
        return None
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0])


def check_finite_tensors(
    tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], source: str, advice: str
) -> None:
    """Refuse weights with NaN or infinity, naming the tensor, the index and `source`."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, tensor in items:
        index = first_nonfinite(tensor.detach())
        if index is not None:
            at = f"[{', '.join(map(str, index))}]" if index else ""
            value = tensor.detach()[index].item()
            raise CrossdiffError(
                f"{source} has a non-finite weight: {name}{at} = {value}; {advice}"
            )


def damaged_checkpoint_entry(
    tensors: Mapping[str, Tensor], weights: Iterable[str], optimizer_prefix: str
) -> str | None:
    """What makes a training checkpoint unfit to resume, or None: a NaN/inf in one of its
    `weights` (names in `tensors`) or in its optimizer state (keys starting with
    `optimizer_prefix`), or a negative Adam second moment (`exp_avg_sq`, whose square root
    each update takes)."""
    checked = [(name, "weight") for name in weights]
    checked += [
        (k, "value in the optimizer state") for k in tensors if k.startswith(optimizer_prefix)
    ]
    for name, what in checked:
        tensor = tensors[name].detach()
        index = first_nonfinite(tensor)
        problem = "non-finite"
        if index is None and name.endswith("exp_avg_sq") and bool((tensor < 0).any()):
            index = tuple(int(i) for i in (tensor < 0).nonzero()[0])
            problem, what = "negative", "Adam second moment (each update takes its square root)"
        if index is not None:
            at = f"[{', '.join(map(str, index))}]" if index else ""
            shown = name.removeprefix("model.")
            return f"{problem} {what}: {shown}{at} = {tensor[index].item()}"
    return None


def move_aside(files: Iterable[Path], folder: Path) -> Path:
    """Move `files` (those that exist) into a new `folder/damaged-N/`, so a rerun no longer
    finds them but they stay for a look; return that folder. Under torchrun only rank 0 moves
    them (every rank reads the same checkpoint)."""
    from crossdiff.plumbing.distributed import dist_info

    n = 1
    while (folder / f"damaged-{n}").exists():
        n += 1
    target = folder / f"damaged-{n}"
    if not dist_info().is_main:
        return target
    target.mkdir(parents=True)
    for file in files:
        if file.exists():
            file.replace(target / file.name)
    return target


def check_finite_module(
    module: torch.nn.Module, source: str, advice: str, *, buffers: bool = True
) -> None:
    """Refuse a module whose parameters (and, with `buffers`, buffers) hold NaN/inf. Language
    models pass buffers=False: TransformerLens keeps -inf in its attention-mask buffers."""
    check_finite_tensors(
        module.state_dict() if buffers else module.named_parameters(), source, advice
    )


def store_position(store: Any, token: int) -> str:
    """'shard <file>, row <r>' of store token `token` (a global index in store order)."""
    shards = store.manifest["shards"]
    for info in shards:
        if info["start"] <= token < info["start"] + info["n_tokens"]:
            return f"shard {info['file']}, row {token - info['start']}"
    return f"token {token}"


def locate_nonfinite_in_store(store: Any, chunk: int = 65536) -> str | None:
    """Where the first non-finite activation of `store` is ('shard ..., row ..., model m, dim d'),
    or None if every activation is finite. Reads the whole store (used after a check failed)."""
    for start in range(0, store.n_tokens, chunk):
        acts = store.read_acts(start, min(start + chunk, store.n_tokens))
        index = first_nonfinite(acts)
        if index is not None:
            row, model, dim = index
            value = acts[index].item()
            return (
                f"{store_position(store, start + row)}, model {model}, dimension {dim} "
                f"(value {value})"
            )
    return None


def check_finite_acts(x: Tensor, where: str, *, store: Any = None, first_token: int = 0) -> None:
    """Refuse activations [batch, n_models, d] with NaN/inf. With `store` and the batch's first
    store token, the message gives the shard file and row; `where` says what was being done."""
    index = first_nonfinite(x)
    if index is None:
        return
    row = index[0]
    rest = ", ".join(f"{n} {i}" for n, i in zip(("model", "dimension"), index[1:], strict=False))
    if store is not None:
        place = f"store {store.path}, {store_position(store, first_token + row)}, {rest}"
        advice = "harvest the store again (or remove those tokens)"
    else:
        place = f"token {first_token + row}, {rest}"
        advice = "check how the activations were made and drop or fix those tokens"
    raise CrossdiffError(
        f"non-finite activation (value {x[index].item()}) in {where}: {place}; {advice}"
    )
