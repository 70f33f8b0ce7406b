"""A lock file per folder, so two processes never write one run or one store at a time.

The lock file holds the holder's pid, host and process start time (JSON). Taking a lock creates
the file with O_EXCL; if it exists and its holder is alive on this host, the lock is refused
with the holder's pid; if the holder is gone (killed, crashed), the stale lock is taken over with
a note. Under torchrun only rank 0 takes it (the other ranks are part of the same job).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import CrossdiffError


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # psutil missing, or no such process
        return None


def _alive(holder: dict[str, Any]) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    started, recorded = _start_time(pid), holder.get("started")
    # a live process with the same pid but another start time reused the pid: the holder is gone
    return started is None or recorded is None or abs(started - float(recorded)) < 1.0


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a lock being written, or a damaged one: treated as stale below


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def acquire(path: Path, what: str) -> Path:
    """Take the lock file `path` for this process; raise if a live process holds it."""
    if path.parent.exists() and not path.parent.is_dir():
        raise CrossdiffError(f"{path.parent} is a file; {what} must be a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _start_time(os.getpid()),
        "locked_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "what": what,
    }
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if not holder and _age(path) < 2.0:
                time.sleep(0.05)  # its holder has created it and is writing its pid
                continue
            same_host = holder.get("host") in (None, me["host"])
            if holder.get("pid") == me["pid"] and same_host:
                return path  # this process holds it already
            if not same_host:
                raise CrossdiffError(
                    f"{what} is locked by process {holder.get('pid')} on host {holder.get('host')} "
                    f"({path}); wait for it to finish, or delete {path} if that process is gone"
                ) from None
            if _alive(holder):
                raise CrossdiffError(
                    f"{what} is in use by another crossdiff process (pid {holder.get('pid')}, "
                    f"since {holder.get('locked_at')}; lock file {path}). Wait for it to finish "
                    "or stop it, or use another folder"
                ) from None
            print(
                f"[crossdiff] taking over the stale lock {path} of process "
                f"{holder.get('pid')}, which is no longer running"
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise CrossdiffError(f"could not take the lock {path}: other processes keep taking it")


def release(path: Path) -> None:
    holder = _read_holder(path)
    if holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def folder_lock(path: Path, what: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold the lock file `path` for the duration (no-op when not `enabled`, e.g. rank > 0)."""
    if not enabled:
        yield
        return
    already = path.exists() and _read_holder(path).get("pid") == os.getpid()
    created = not path.parent.exists()
    acquire(path, what)
    try:
        yield
    finally:
        if not already:  # a nested use leaves the lock to the outer one
            release(path)
            if created and path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()  # made only to hold the lock: a refused job leaves no folder
