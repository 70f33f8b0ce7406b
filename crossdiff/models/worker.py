"""`python -m crossdiff.models.worker SPEC.json`: train one language model in its own process.

Started by `train_language_models` when it trains the dense and the MoE model at the same time;
SPEC.json says which model, where the token sets are, and the options. A user-facing error is
written to the spec's error file so the parent can repeat it.

The worker dies with its parent (Linux: the kernel sends it SIGTERM when the parent exits, even
by kill -9), so an interrupted run never leaves a worker writing into its checkpoint folder."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from crossdiff.common import CrossdiffError, read_json

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


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m crossdiff.models.worker SPEC.json", file=sys.stderr)
        return 2
    die_with_parent()
    from crossdiff.models.train import run_worker

    try:
        run_worker(argv[0])
    except CrossdiffError as err:
        Path(read_json(argv[0], what="worker spec")["error_file"]).write_text(str(err))
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
