"""`python -m crossdiff.models.worker SPEC.json`: train one language model in its own process.

Started by `train_language_models` when it trains the dense and the MoE model at the same time;
SPEC.json says which model, where the token sets are, and the options. A user-facing error is
written to the spec's error file so the parent can repeat it.

The worker dies with its parent (Linux: the kernel sends it SIGTERM when the parent exits, even
by kill -9), so an interrupted run never leaves a worker writing into its checkpoint folder."""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path

from crossdiff.models.lifetime import die_with_parent
from crossdiff.plumbing.common import CrossdiffError, environment_message, is_write_error, read_json


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m crossdiff.models.worker SPEC.json", file=sys.stderr)
        return 2
    die_with_parent()
    from crossdiff.models.train import run_worker

    try:
        run_worker(argv[0])
    except CrossdiffError as err:
        return _report(argv[0], str(err), 2)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a full disk, a failed write, a bug: still one line for the parent
        traceback.print_exc()
        return _report(argv[0], worker_failure_message(err), 1)
    return 0


def worker_failure_message(err: BaseException) -> str:
    """One line for an error that is not crossdiff's own (the traceback goes to stderr)."""
    if isinstance(err, (OSError, MemoryError)) or is_write_error(err):
        return environment_message(err)
    return f"{type(err).__name__}: {err} (an unexpected error; its traceback is above)"


def _report(spec: str, message: str, code: int) -> int:
    """Write `message` to the spec's error file, for the parent to repeat; return `code`."""
    with contextlib.suppress(OSError, CrossdiffError):  # e.g. a full disk: stderr still has it
        Path(read_json(spec, what="worker spec")["error_file"]).write_text(message)
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
