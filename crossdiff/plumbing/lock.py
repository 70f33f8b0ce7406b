"""A lock file per folder, so two processes never write one run or one store at a time.

The lock itself is `filelock`'s: an flock(2) on the lock file, which the kernel drops when its
holder exits, however it exits. The file also holds the holder's pid, host and process start time
(JSON), for the messages: a lock held by a live process is refused with its pid; a lock whose
holder is gone (killed, crashed) is taken over with a note naming it. Under torchrun only rank 0
takes it (the other ranks are part of the same job). The file is removed on release.
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

KERNEL_LOCK = "flock"  # a record's "lock": the holder also held the kernel lock on the file
_WAIT_S = 0.5  # how long a refused lock is retried (filelock retries a file unlinked under it)
_HELD: dict[str, Any] = {}  # abspath -> this process's filelock.FileLock (kept: freed, it unlocks)


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # psutil missing, or no such process
        return None


def _alive(holder: dict[str, Any]) -> bool:
    # filelock cannot see a lock taken by O_EXCL alone (crossdiff before its locks moved onto
    # filelock): such a record's holder counts as long as its process runs
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
        return {}  # no lock, a record being written, or a damaged one


def _live_holder(path: Path) -> dict[str, Any]:
    """The record of a holder that has the kernel lock (it may still be writing it)."""
    for _ in range(20):
        holder = _read_holder(path)
        if holder:
            return holder
        time.sleep(0.05)
    return {}


def _refusal(path: Path, what: str, holder: dict[str, Any], host: str) -> CrossdiffError:
    if holder.get("host") not in (None, host):
        return CrossdiffError(
            f"{what} is locked by process {holder.get('pid')} on host {holder.get('host')} "
            f"({path}); wait for it to finish, or delete {path} if that process is gone"
        )
    return CrossdiffError(
        f"{what} is in use by another crossdiff process (pid {holder.get('pid')}, "
        f"since {holder.get('locked_at')}; lock file {path}). Wait for it to finish "
        "or stop it, or use another folder"
    )


def acquire(path: Path, what: str) -> Path:
    """Take the lock file `path` for this process; raise if a live process holds it."""
    from filelock import FileLock, SoftFileLock, Timeout

    if path.parent.exists() and not path.parent.is_dir():
        raise CrossdiffError(f"{path.parent} is a file; {what} must be a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _start_time(os.getpid()),
        "locked_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "what": what,
        "lock": KERNEL_LOCK,
    }
    if os.path.abspath(path) in _HELD:
        return path  # this process holds it already
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=_WAIT_S, poll_interval=0.05)
    except Timeout:
        raise _refusal(path, what, _live_holder(path), me["host"]) from None
    if isinstance(lock, SoftFileLock):
        # filelock fell back to an existence lock (a filesystem without flock): its file holds
        # filelock's own record of the holder, which this one must not overwrite
        _HELD[os.path.abspath(path)] = lock
        return path
    previous = _read_holder(path)
    if previous:
        gone = previous.get("lock") == KERNEL_LOCK or not _alive(previous)
        if previous.get("host") not in (None, me["host"]) or not gone:
            lock.release(force=True)
            raise _refusal(path, what, previous, me["host"])
        print(
            f"[crossdiff] taking over the stale lock {path} of process "
            f"{previous.get('pid')}, which is no longer running"
        )
    path.write_text(json.dumps(me))  # the kernel lock is on the file, not on this descriptor
    _HELD[os.path.abspath(path)] = lock
    return path


def release(path: Path) -> None:
    lock = _HELD.pop(os.path.abspath(path), None)
    if _read_holder(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)  # before the unlock: a waiter retries on an unlinked file
    if lock is not None:
        lock.release(force=True)


@contextmanager
def folder_lock(path: Path, what: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold the lock file `path` for the duration (no-op when not `enabled`, e.g. rank > 0)."""
    if not enabled:
        yield
        return
    already = os.path.abspath(path) in _HELD
    created = not path.parent.exists()
    acquire(path, what)
    try:
        yield
    finally:
        if not already:  # a nested use leaves the lock to the outer one
            release(path)
            if created and path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()  # made only to hold the lock: a refused job leaves no folder
