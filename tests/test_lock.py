"""crossdiff.plumbing.lock on filelock: a lock held by a live crossdiff process is refused with its
pid; once that process is killed (no chance to clean up), its lock is taken over with a note."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.lock import KERNEL_LOCK, acquire, folder_lock, release

HOLDER = """
import sys
from pathlib import Path
from crossdiff.plumbing.lock import acquire
acquire(Path(sys.argv[1]), "store x")
print("held", flush=True)
sys.stdin.read()
"""


def _holder(lock: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_holders_lock_is_refused_while_it_lives_and_taken_over_after(tmp_path, capsys):
    lock = tmp_path / "store" / ".harvest.lock"
    proc = _holder(lock)
    try:
        record = json.loads(lock.read_text())
        assert record["pid"] == proc.pid and record["lock"] == KERNEL_LOCK
        with pytest.raises(
            CrossdiffError, match=rf"in use by another crossdiff process \(pid {proc.pid}"
        ):
            acquire(lock, "store x")
        assert json.loads(lock.read_text())["pid"] == proc.pid  # a refusal leaves the record
    finally:
        proc.send_signal(signal.SIGKILL)  # no release, no cleanup: the kernel drops the flock
        proc.wait()
    assert lock.exists()  # the killed holder's file is still there, its flock is not
    with folder_lock(lock, "store x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert f"stale lock {lock} of process {proc.pid}, which is no longer running" in (
            capsys.readouterr().out
        )
    assert not lock.exists()


def test_a_lock_is_taken_again_by_its_holder_and_released_once(tmp_path):
    lock = tmp_path / "run.lock"
    with folder_lock(lock, "run"):
        with folder_lock(lock, "run"):  # nested: the outer one keeps it
            pass
        assert lock.exists()
    assert not lock.exists()
    acquire(lock, "run")
    release(lock)
    assert not lock.exists()


def test_a_lock_recorded_by_another_host_is_refused_with_that_host(tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "lock": KERNEL_LOCK}))
    with pytest.raises(CrossdiffError, match=r"locked by process 4242 on host elsewhere"):
        acquire(lock, "run")
    assert json.loads(lock.read_text())["host"] == "elsewhere"
