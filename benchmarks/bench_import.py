"""Start-up cost: `import crossdiff` and `crossdiff --help` in fresh processes, next to
`import sae_lens` (what `import crossdiff` cost before it became light) and a bare interpreter.

    .venv/bin/python benchmarks/bench_import.py [--runs 5]

Each line is the median wall time of --runs fresh processes (and their range), plus the peak RSS
of the median run's process. Run it on an idle machine: start-up time is mostly disk and CPU
contention when other work runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "bare interpreter (python -c pass)": [sys.executable, "-c", "pass"],
    "import crossdiff": [sys.executable, "-c", "import crossdiff"],
    "crossdiff --help": [sys.executable, "-m", "crossdiff", "--help"],
    "crossdiff --version": [sys.executable, "-m", "crossdiff", "--version"],
    "reference: import sae_lens": [sys.executable, "-c", "import sae_lens"],
}


def one_run(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    kib = usage.ru_maxrss * (1 if sys.platform != "darwin" else 1 / 1024)
    return seconds, kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cores, load average {load:.2f}")
    for name, command in CASES.items():
        runs = sorted(one_run(command) for _ in range(args.runs))
        seconds = [s for s, _ in runs]
        median_seconds, median_rss = runs[len(runs) // 2]
        print(
            f"{name:36s} median {median_seconds:6.3f} s (runs {min(seconds):.3f}-"
            f"{max(seconds):.3f} s, spread {statistics.pstdev(seconds):.3f}), "
            f"peak RSS {median_rss:6.0f} MiB"
        )


if __name__ == "__main__":
    main()
