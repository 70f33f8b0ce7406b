"""The report's files written as one set: never a new report.json beside an old report.html.

write_report writes every file into a staging folder inside the report folder
(`.report.staging/`), then commits: it writes the list of the new files, renames the staging
folder to `.report.commit/` (one atomic rename: the commit point) and moves each file into the
report folder, removing the old set's files that the new one lacks (a figure left out). A crash
before the rename leaves the old set untouched and a staging folder that the next write
removes; a crash after it leaves `.report.commit/`, which the next write (or `recover`) finishes
first. So the folder holds the old set or the new one, and while `.report.commit/` exists the
readers know a commit is under way (`check_complete`). Temporary files of an older crossdiff's
direct writes (`.report.json.XXXX.tmp`, 0 bytes after a kill -9) are removed as well.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crossdiff.plumbing.common import CrossdiffError, atomic_path, fsync_dir

STAGING = ".report.staging"
COMMIT = ".report.commit"
_LIST = ".files.json"  # in the commit folder: the names of the new set
BASE_FILES = ("report.json", "report.md", "report.html", "explorer.json")
RETIRED_FILES = ("controls.png",)  # written by an older crossdiff; a new set removes them


def set_names() -> set[str]:
    """Every name a report set can hold: its documents and one PNG per figure."""
    from crossdiff.report.figures import FIGURES

    return {*BASE_FILES, *RETIRED_FILES, *(f"{name}.png" for name in FIGURES)}


def recover(out_dir: Path) -> list[str]:
    """Finish an interrupted commit, drop an unfinished staging folder and stale temporary
    files; return what was done (one line each), for the log."""
    done = []
    if (out_dir / COMMIT).is_dir():
        _roll_forward(out_dir)
        done.append(f"finished writing the report set that an interrupted run left in {out_dir}")
    if (out_dir / STAGING).exists():
        shutil.rmtree(out_dir / STAGING)
        done.append(f"removed the unfinished report files of an interrupted run in {out_dir}")
    names = set_names()
    for child in out_dir.iterdir() if out_dir.is_dir() else ():
        stem = child.name[1:].rsplit(".", 2)[0] if child.name.startswith(".") else ""
        if child.name.endswith(".tmp") and stem in names and child.is_file():
            child.unlink()
            done.append(f"removed the temporary file {child} of an interrupted run")
    return done


@contextmanager
def report_set(out_dir: Path, *, quiet: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error, its files replace
    the report set in `out_dir` as one set. On an error the old set stays as it was."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for line in recover(out_dir):
        if not quiet:
            print(f"note: {line}")
    staging = out_dir / STAGING
    staging.mkdir()
    try:
        yield staging
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        with atomic_path(staging / _LIST) as tmp:
            tmp.write_text(json.dumps(files))
        _fsync_files(staging, files)
        os.replace(staging, out_dir / COMMIT)  # the commit point
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _roll_forward(out_dir)


def check_complete(out_dir: Path) -> None:
    """Refuse to read a report folder in the middle of a commit (its files may be mixed)."""
    if (out_dir / COMMIT).is_dir():
        raise CrossdiffError(
            f"the report in {out_dir} is being rewritten, or its writer was stopped while "
            "replacing the files; wait for it to finish, or run `crossdiff report` (or "
            "write_report) into that folder again, which completes it first"
        )


def _roll_forward(out_dir: Path) -> None:
    """Move the committed files into `out_dir` and remove the old set's others (idempotent)."""
    commit = out_dir / COMMIT
    try:
        files = json.loads((commit / _LIST).read_text())
    except (OSError, ValueError) as err:  # the list is written before the commit point
        raise CrossdiffError(
            f"{commit} has no readable file list ({err}); remove that folder and write the "
            "report again"
        ) from err
    for name in files:
        if (commit / name).exists():
            os.replace(commit / name, out_dir / name)
    for name in set_names() - set(files):
        (out_dir / name).unlink(missing_ok=True)
    fsync_dir(out_dir)
    (commit / _LIST).unlink()
    commit.rmdir()


def _fsync_files(folder: Path, names: list[str]) -> None:
    for name in names:
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(folder)
