"""Training the two language models at the same time, each in its own worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformerConfig

from crossdiff.data.tokens import TokenSet
from crossdiff.models.checkpoints import finished_history
from crossdiff.models.io import config_to_dict
from crossdiff.models.lifetime import PARENT_PID_ENV, parent_death_signal
from crossdiff.models.step import TrainOptions
from crossdiff.plumbing.common import CrossdiffError, write_json_atomic


def train_in_processes(
    cfgs: dict[str, HookedTransformerConfig],
    train: TokenSet,
    heldout: TokenSet,
    out_dir: Path,
    opts: TrainOptions,
    device: torch.device,
    threads: int,
) -> dict[str, list[dict[str, Any]]]:
    """Train each model in its own `python -m crossdiff.models.worker` process with `threads`
    threads. The token sets go through safetensors files and the rest through a JSON spec, so
    nothing is pickled and a user's script needs no `if __name__ == "__main__"` guard."""
    work_dir = out_dir / "checkpoints"
    train_path = train.save(work_dir / "train_tokens.safetensors")
    heldout_path = heldout.save(work_dir / "heldout_tokens.safetensors")
    print(f"training both models at once in two processes, {threads} thread(s) each")
    processes: dict[str, subprocess.Popen] = {}
    error_files = {name: work_dir / f"{name}.error.txt" for name in cfgs}
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
    die_with_parent = parent_death_signal()  # set in the child between fork and exec
    previous_handler = exit_on_sigterm()
    try:
        for position, (name, cfg) in enumerate(cfgs.items()):
            error_files[name].unlink(missing_ok=True)
            spec = {
                "name": name,
                "config": config_to_dict(cfg),
                "train": str(train_path),
                "heldout": str(heldout_path),
                "out_dir": str(out_dir),
                "options": opts.as_dict(),
                "device": str(device),
                "threads": threads,
                "position": position,
                "error_file": str(error_files[name]),
            }
            spec_path = write_json_atomic(work_dir / f"{name}.worker.json", spec)
            command = [sys.executable, "-m", "crossdiff.models.worker", str(spec_path)]
            processes[name] = subprocess.Popen(command, env=env, preexec_fn=die_with_parent)
        codes = {name: process.wait() for name, process in processes.items()}
    finally:
        for process in processes.values():  # on an error, Ctrl-C or SIGTERM: reap the workers
            if process.poll() is None:
                process.terminate()
                process.wait()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        messages = [
            f"{name} (exit code {code}): {_worker_message(error_files[name], code)}"
            for name, code in failed.items()
        ]
        raise CrossdiffError(
            "training failed for " + "; ".join(messages) + " (its output is above; a rerun "
            "resumes from the last checkpoint; --no-parallel trains in this process)"
        )
    for path in (train_path, heldout_path, *work_dir.glob("*.worker.json")):
        path.unlink(missing_ok=True)
    return {
        name: finished_history(name, cfgs[name], train, out_dir, opts, quiet=True) or []
        for name in cfgs
    }


def _worker_message(error_file: Path, code: int) -> str:
    """What a failed worker said (its error file), or what its exit code tells."""
    text = error_file.read_text().strip() if error_file.exists() else ""
    if text:
        return text
    if code < 0:
        names = {int(sig): sig.name for sig in signal.Signals}
        return f"it was killed by signal {-code} ({names.get(-code, 'unknown')})"
    return "it stopped without a message (its traceback, if any, is above)"


def exit_on_sigterm() -> Any:
    """Make SIGTERM raise SystemExit, so the `finally` that reaps the workers runs; return the
    previous handler (None when not in the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)
