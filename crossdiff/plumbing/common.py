"""Pieces every stage shares: user-facing errors, atomic writes, device/dtype/seed handling."""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CrossdiffError(ValueError):
    """An error in what the user asked for. The message says what was wrong and what to do."""


class DiskFullError(CrossdiffError):
    """A write failed because the disk (or the quota) is full; `errno` and `path` say which."""

    def __init__(self, message: str, path: Path, err_no: int):
        super().__init__(message)
        self.path = path
        self.errno = err_no


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how safetensors (whose SafetensorError is not an OSError) spells a full disk in its message:
# "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: ... })"
_SAFETENSORS_DISK_FULL = {
    errno.ENOSPC: (f"code: {errno.ENOSPC},", "StorageFull", "No space left on device"),
    errno.EDQUOT: (f"code: {errno.EDQUOT},", "QuotaExceeded", "Disk quota exceeded"),
}


def disk_full_errno(err: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `err` says the disk (or the quota) is full, else None: an OSError,
    or safetensors' SafetensorError, which carries the OS error only in its text."""
    if isinstance(err, OSError):
        return err.errno if err.errno in DISK_FULL_ERRNOS else None
    if type(err).__name__ == "SafetensorError":
        text = str(err)
        for code, spellings in _SAFETENSORS_DISK_FULL.items():
            if any(s in text for s in spellings):
                return code
    return None


def is_write_error(err: BaseException) -> bool:
    """True for an I/O failure while writing: an OSError or safetensors' SafetensorError that
    wraps one (its text holds "IoError")."""
    return isinstance(err, OSError) or (
        type(err).__name__ == "SafetensorError" and "IoError" in str(err)
    )


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_full_error(
    path: Path, err: BaseException, needed_bytes: int | None = None
) -> DiskFullError:
    """The error for a write of `path` that hit a full disk (`err`: an OSError or a
    SafetensorError, see disk_full_errno): which file, how much space it needs (when known) and
    how much is free."""
    try:
        free = _megabytes(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "unknown"
    need = f"about {_megabytes(needed_bytes)}" if needed_bytes else "more space than is free"
    return DiskFullError(
        f"the disk is full: could not write {path} (it needs {need}; {free} free on that disk). "
        "Nothing partial was left behind. Free some space (or choose another --out) and run "
        "the same command again",
        path,
        disk_full_errno(err) or errno.ENOSPC,
    )


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


def refuse_float16_training(dtype: str | torch.dtype, what: str, option: str) -> None:
    """Adam cannot train float16 parameters: its squared gradients (below 2.4e-4 squared) and
    its eps of 1e-8 underflow to 0 in float16, so an update divides by zero and the weights
    become inf/NaN within a few steps whatever the learning rate. Refuse it up front."""
    if str(dtype).removeprefix("torch.") != "float16":
        return
    raise CrossdiffError(
        f"{what} cannot be trained with float16 parameters ({option}=float16): in float16 "
        "Adam's squared gradients and its eps (1e-8) round to 0, so an update divides by zero "
        "and the weights become NaN within a few steps, whatever the learning rate. Train in "
        "float32 (the default; on CUDA the big matmuls already run in bfloat16 under autocast) "
        "or bfloat16; float16 stays fine for the activation store and for loading a trained "
        "model or crosscoder"
    )


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """'auto'/None picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise CrossdiffError(
            f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrossdiffError(
            f"device {name!r} was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CrossdiffError(f"device {name!r} was asked for but MPS is not available; use cpu")
    return device


MAX_SEED = 2**32 - 1  # numpy's range; torch's 64 bits leave room for the seeds derived from it


def check_seed(seed: Any, what: str = "seed") -> int:
    """`seed` if it is a whole number from 0 to MAX_SEED, else a CrossdiffError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise CrossdiffError(f"{what}={seed!r} must be a whole number from 0 to {MAX_SEED}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise CrossdiffError(
            f"{what}={seed} is out of range: a seed is a whole number from 0 to {MAX_SEED} "
            "(32 bits); choose a smaller one"
        )
    return int(seed)


def _seed_option(text: str) -> int:
    """argparse type of --seed: a CLI error (exit 2, one line) for a seed out of range."""
    try:
        return check_seed(int(text), "--seed")
    except ValueError as err:  # CrossdiffError is a ValueError
        message = str(err) if isinstance(err, CrossdiffError) else f"not a whole number: {text!r}"
        raise argparse.ArgumentTypeError(message) from err


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# Read once: os.umask can only be read by setting it, which is not safe to do per write.
_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
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


FILE_MODE = 0o666 & ~_UMASK  # the mode of every file crossdiff writes (the umask's)


@contextmanager
def atomic_path(path: str | Path, *, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` in one step.

    A crash or an exception leaves `path` as it was (absent or the previous version). A full
    disk is a DiskFullError naming `path` and the space it needs (`needed_bytes` if known).
    The file gets the umask's mode (mkstemp and some writers, e.g. safetensors, create 0600).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(path, err, needed_bytes) from err
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)  # after writing: a writer may have re-created the file
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except Exception as err:
        if disk_full_errno(err) is not None:
            raise disk_full_error(path, err, needed_bytes) from err
        if is_write_error(err) and not isinstance(err, OSError):
            raise CrossdiffError(
                f"could not write {path}: {err}. Nothing partial was left behind; check the "
                "disk and the folder, then run the same command again"
            ) from err
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def environment_message(err: BaseException) -> str:
    """One line for a failure of the machine rather than of crossdiff (an OSError, a failed
    safetensors write, a MemoryError): what failed, on which file, and what to do."""
    if isinstance(err, MemoryError):
        return "out of memory; use smaller sizes (batch, d_sae, tokens) or a larger machine"
    if not isinstance(err, OSError):  # safetensors' SafetensorError: the OS error is in its text
        if disk_full_errno(err) is not None:
            return f"the disk is full ({err}); free some space or choose another --out"
        return f"a write failed ({err}); check the disk and the folder, then run it again"
    where = f" {err.filename}" if err.filename else ""
    hint = {
        errno.ENOSPC: "free some space or choose another --out, then run it again",
        errno.EDQUOT: "the disk quota is used up; free some space or choose another --out",
        errno.EROFS: "the filesystem is read-only; choose another --out",
        errno.EACCES: "you may not write there; choose another --out",
    }.get(err.errno or 0, "check the path and the disk, then run it again")
    return f"cannot access{where}: {err.strerror or err}; {hint}"


def remove_tree(path: Path) -> None:
    """shutil.rmtree for a stage folder, but a symbolic link is not deleted through: an error
    names the link and its target (an empty target is left as it is: nothing to remove)."""
    if not path.is_symlink():
        shutil.rmtree(path)
        return
    target = path.resolve()
    if target.is_dir() and not any(target.iterdir()):
        return
    raise CrossdiffError(
        f"{path} is a symbolic link to {target}, and its old contents would have to be deleted "
        "to redo this stage; crossdiff does not delete through a link. Remove the link (`rm "
        f"{path}`) to let crossdiff make a new folder there, or empty {target} yourself; then "
        "run the same command again"
    )


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """The size of a safetensors file of `tensors`, near enough for a disk-space message."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 1024 * (len(tensors) + 1)


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Check that `path` can be (or is) a folder crossdiff may write into, without creating it:
    not a file, not under a file, on a writable filesystem."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CrossdiffError(
            f"{option} {path} is a file, not a folder; give a folder path (it is created if "
            "missing)"
        )
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise CrossdiffError(
            f"{option} {path} lies under {existing}, which is a file, so the folder cannot be "
            "created; choose a path under a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CrossdiffError(
            f"{option} {path} cannot be written: {existing} is not writable (read-only "
            "filesystem or no permission); choose a folder you can write to"
        )
    return path


@contextmanager
def allocation_guard(what: str, nbytes: int) -> Iterator[None]:
    """Turn an out-of-memory failure while allocating `what` into an error that says the size."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        text = str(err).lower()
        if not isinstance(err, MemoryError) and not (
            "out of memory" in text or "not enough memory" in text or "can't allocate" in text
        ):
            raise
        raise CrossdiffError(
            f"not enough memory for {what}: it needs about {nbytes / 2**30:.2f} GiB ({err}). "
            "Choose a smaller size (e.g. a lower --expansion / d_sae) or a device with more memory"
        ) from err


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
    parser.add_argument(
        "--seed", type=_seed_option, default=0, help=f"random seed, 0 to {MAX_SEED} (default: 0)"
    )
