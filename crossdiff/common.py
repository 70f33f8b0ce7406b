"""Pieces every stage shares: user-facing errors, atomic writes, device/dtype/seed handling."""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CrossdiffError(ValueError):
    """An error in what the user asked for. The message says what was wrong and what to do."""


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise CrossdiffError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """'auto'/None picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrossdiffError(
            f"device {name!r} was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CrossdiffError(f"device {name!r} was asked for but MPS is not available; use cpu")
    return device


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# Read once: os.umask can only be read by setting it, which is not safe to do per write.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` in one step.

    A crash or an exception leaves `path` as it was (absent or the previous version).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise CrossdiffError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CrossdiffError(f"{what} {path} is not valid JSON ({err}); re-create it") from err


def add_runtime_arguments(parser: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    """--device, --dtype and --seed, the same on every subcommand."""
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or mps (default: auto picks the best)"
    )
    parser.add_argument(
        "--dtype",
        default=dtype_default,
        choices=sorted(DTYPES),
        help=f"compute dtype (default: {dtype_default})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
