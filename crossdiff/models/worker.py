"""`python -m crossdiff.models.worker SPEC.json`: train one language model in its own process.

Started by `train_language_models` when it trains the dense and the MoE model at the same time;
SPEC.json says which model, where the token sets are, and the options. A user-facing error is
written to the spec's error file so the parent can repeat it.

The worker dies with its parent (Linux: the kernel sends it SIGTERM when the parent exits, even
by kill -9), so an interrupted run never leaves a worker writing into its checkpoint folder."""

from __future__ import annotations

import sys
from pathlib import Path

from crossdiff.common import CrossdiffError, read_json
from crossdiff.models.lifetime import die_with_parent


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
