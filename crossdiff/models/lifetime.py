"""A child process's lifetime tied to its parent's (Linux): the kernel sends the child SIGTERM
when the parent ends, even by kill -9, so an interrupted run never leaves a worker writing.

Used by `train_language_models` (which starts the workers) and by `crossdiff.models.worker` (the
workers themselves); kept apart from both so neither imports the other."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PARENT_PID_ENV = "CROSSDIFF_WORKER_PARENT"
_PR_SET_PDEATHSIG = 1


def parent_death_signal() -> Callable[[], None] | None:
    """A `preexec_fn` for Popen that asks the kernel to send the child SIGTERM when its parent
    ends (Linux; it survives the exec, so it holds while the child is still importing torch).
    None where there is no prctl. The ctypes function is looked up here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    term = int(signal.SIGTERM)
    return lambda: prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0)


def die_with_parent() -> None:
    """Set the parent-death signal (again: the worker may be started by other code) and exit
    now if the parent has already ended."""
    request = parent_death_signal()
    if request is not None:
        request()
    parent = os.environ.get(PARENT_PID_ENV)
    if parent and os.getppid() != int(parent):  # the parent died before prctl took effect
        raise SystemExit(143)
