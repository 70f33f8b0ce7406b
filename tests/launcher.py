"""Launching test jobs in several processes under torchrun (CPU, gloo): one helper for every
torchrun test. A job is a script in tests/distributed_jobs/ or a `python -m crossdiff` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

JOBS = Path(__file__).parent / "distributed_jobs"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def launch(script: str, *args, nproc: int, env: dict | None = None, check: bool = True):
    """Run a job script in `nproc` processes under torchrun (or plainly for one process)."""
    job = [str(JOBS / script), *map(str, args)]
    if nproc == 1:
        return _run([sys.executable, *job], env, check)
    return _run([*TORCHRUN, f"--nproc_per_node={nproc}", *job], env, check)


def launch_module(*args, nproc: int, env: dict | None = None, check: bool = True):
    """`python -m crossdiff ARGS` in `nproc` processes under torchrun."""
    command = [*TORCHRUN, f"--nproc_per_node={nproc}", "-m", "crossdiff", *map(str, args)]
    return _run(command, env, check)


def _run(command: list[str], env: dict | None, check: bool) -> subprocess.CompletedProcess:
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"} | (env or {})
    result = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
