"""Stage records of `crossdiff run`: when a stage is reused, resumed or redone.

A stage's key is the fingerprint of its options and of its inputs (the output fingerprints of
the stages it reads). `stage.pending.json` is written when a stage starts, `stage.json` (with the
stage's output fingerprint) when it has finished. On a re-run:

- `stage.json` with the same key: the stage is reused (skipped);
- `stage.pending.json` with the same key: the unfinished stage resumes (its checkpoints, shards);
- either record with another key: the option or input changed, so the stage folder and the
  folders of the stages after it are removed and the stage is redone (as a build system does);
- a `stage.json` of an older crossdiff (no key) with the same options, all of whose input stages
  were reused: reused, and its record rewritten with fingerprints (a note says its inputs could
  not be checked); if an input stage was just (re)made, it is redone;
- a folder without records (an older crossdiff): the stage resumes under its own checks;
- a `stage.json` with the same key whose folder no longer has the output fingerprint it records
  (a file edited or replaced since): refused, naming the files, never reused or removed;
- a record marked `written_by` (a stage subcommand wrote into the folder since): refused.

A redone stage's folder and those of the stages after it are moved aside into `.aside/<stage>/`
of the run folder, not removed: they are put back if the stage fails before writing anything (a
check inside it refused), and removed once the stage has finished.

The output fingerprint hashes the key with what the stage wrote, so a stage redone with other
options always hands a new fingerprint to the stages after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import CrossdiffError, read_json, remove_tree, write_json_atomic
from crossdiff.plumbing.fingerprint import (
    canonical,
    describe_changes,
    fingerprint,
    folder_digests,
)
from crossdiff.plumbing.stage_marker import (  # noqa: F401 (mark_written_by: re-exported)
    PENDING,
    RECORD,
    RECORD_VERSION,
    mark_written_by,
)

ASIDE = ".aside"  # the run folder's sub-folder that holds the stages a redo replaces


def stage_key(options: dict[str, Any], inputs: dict[str, str]) -> str:
    return fingerprint({"options": canonical(options), "inputs": inputs})


@dataclass
class StageDecision:
    action: str  # "skip" | "adopt" (a record without fingerprints) | "resume" | "redo" | "run"
    message: str
    key: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.action in ("skip", "adopt")


def decide(
    name: str,
    stage_dir: Path,
    options: dict[str, Any],
    inputs: dict[str, str],
    later: list[str],
    *,
    inputs_reused: bool = True,
) -> StageDecision:
    """What to do with stage `name` given its records on disk (reads only). `inputs_reused`:
    every stage it reads was reused in this run, so a record without fingerprints (older
    crossdiff) with the same options may be adopted; otherwise its inputs were just made anew."""
    key = stage_key(options, inputs)
    for filename, state in ((RECORD, "finished"), (PENDING, "unfinished")):
        path = stage_dir / filename
        if not path.exists():
            continue
        record = read_json(path, "stage record")
        if record.get("written_by"):
            raise external_error(name, stage_dir, record, later)
        legacy = "key" not in record and state == "finished" and inputs_reused
        if legacy and canonical(record.get("options")) == canonical(options):
            return StageDecision(
                "adopt",
                f"finished in {stage_dir} by an older crossdiff with these options; reusing it "
                "(its inputs were not recorded, so they cannot be checked; delete the folder to "
                "redo it)",
                key,
                record,
            )
        if record.get("key") == key:
            if state == "finished":
                check_output(name, stage_dir, record, later)
                return StageDecision("skip", f"already done in {stage_dir}, skipping", key, record)
            return StageDecision("resume", f"resuming the unfinished stage in {stage_dir}", key)
        what = _what_changed(record, options, inputs)
        redone = ", ".join([name, *later])
        return StageDecision(
            "redo",
            f"the {state} stage in {stage_dir} was made with other {what}; redoing {redone}",
            key,
        )
    if stage_dir.exists() and any(stage_dir.iterdir()):
        return StageDecision("run", f"continuing in {stage_dir} (no stage record)", key)
    return StageDecision("run", f"running into {stage_dir}", key)


def _what_changed(record: dict[str, Any], options: dict[str, Any], inputs: dict[str, str]) -> str:
    if "key" not in record:
        return "settings or inputs (its record predates fingerprints)"
    parts = []
    if canonical(record.get("options", {})) != canonical(options):
        parts.append(f"options ({describe_changes(record.get('options', {}), options)})")
    old_inputs = record.get("inputs", {})
    if old_inputs != inputs:
        changed = sorted(
            k for k in set(old_inputs) | set(inputs) if old_inputs.get(k) != inputs.get(k)
        )
        parts.append(f"inputs (the output of {', '.join(changed)} changed)")
    return " and ".join(parts) or "settings"


def clear(stage_dirs: list[Path]) -> list[Path]:
    """Remove stale stage folders; return those that existed."""
    removed = []
    for folder in stage_dirs:
        if folder.exists():
            remove_tree(folder)  # a symbolic link: an error naming it, not deleted through
            removed.append(folder)
    return removed


def _redo_advice(name: str, stage_dir: Path, later: list[str]) -> str:
    redone = ", ".join([name, *later])
    return (
        f"crossdiff run neither reuses nor removes results it did not make: restore the files, "
        f"or move {stage_dir} out of the run folder to keep it (or delete it) and run again to "
        f"redo {redone}"
    )


def changed_files(stage_dir: Path, record: dict[str, Any]) -> list[str] | None:
    """The files of a finished stage that differ from its record (changed, added or removed);
    [] when its output fingerprint still holds; None when the record has no output (older)."""
    if "output" not in record or "key" not in record:
        return None
    content, files = folder_digests(stage_dir)
    if fingerprint({"key": record["key"], "content": content}) == record["output"]:
        return []
    before = record.get("files")
    if not isinstance(before, dict):
        return ["files (which ones: not recorded by this older stage.json)"]
    names = sorted(set(before) | set(files))
    return [
        f"{n} ({'added' if n not in before else 'removed' if n not in files else 'changed'})"
        for n in names
        if before.get(n) != files.get(n)
    ]


def check_output(name: str, stage_dir: Path, record: dict[str, Any], later: list[str]) -> None:
    """A finished stage's folder still holds what its record says it wrote (its output
    fingerprint), else a CrossdiffError naming the files that differ."""
    changed = changed_files(stage_dir, record)
    if changed:
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        shown = ", ".join(changed[:8]) + more
        raise CrossdiffError(
            f"{stage_dir} changed after the {name} stage finished: {shown} differ from what its "
            f"{RECORD} recorded, so reusing it would mix its record with other files; "
            + _redo_advice(name, stage_dir, later)
        )


def external_error(
    name: str, stage_dir: Path, record: dict[str, Any], later: list[str]
) -> CrossdiffError:
    return CrossdiffError(
        f"{stage_dir} was written by `{record['written_by']}` after crossdiff run made it, so "
        f"its {RECORD} no longer describes it; " + _redo_advice(name, stage_dir, later)
    )


def aside_dir(run_dir: Path, name: str) -> Path:
    return run_dir / ASIDE / name


def move_aside(run_dir: Path, name: str, stage_dirs: list[Path]) -> list[Path]:
    """Move the folders a redo of stage `name` replaces into `.aside/<name>/`; those moved. When
    an earlier redo of it left finished results there already, those stay and these (unfinished)
    folders are removed instead."""
    root = aside_dir(run_dir, name)
    if root.exists():
        return clear(stage_dirs)
    moved = []
    for folder in stage_dirs:
        if folder.exists() or folder.is_symlink():
            root.mkdir(parents=True, exist_ok=True)
            folder.rename(root / folder.name)
            moved.append(folder)
    return moved


def has_output(stage_dir: Path) -> bool:
    """Whether a stage folder holds anything but its records and hidden files."""
    if not stage_dir.is_dir():
        return False
    for path in stage_dir.rglob("*"):
        rel = path.relative_to(stage_dir)
        hidden = any(part.startswith(".") for part in rel.parts)
        if path.is_file() and not hidden and rel.name != RECORD:
            return True
    return False


def restore_aside(run_dir: Path, name: str) -> list[Path]:
    """Put back what a redo of `name` moved aside, when the new stage has written nothing (it
    failed in its own checks); the folders restored ([] when it had written something)."""
    root = aside_dir(run_dir, name)
    if not root.is_dir() or has_output(run_dir / name):
        return []
    restored = []
    for entry in sorted(root.iterdir()):
        target = run_dir / entry.name
        if target.exists():
            remove_tree(target)
        entry.rename(target)
        restored.append(target)
    drop_aside(run_dir, name)
    return restored


def drop_aside(run_dir: Path, name: str) -> None:
    """Remove what a redo of `name` moved aside (the stage has finished)."""
    root = aside_dir(run_dir, name)
    if root.exists():
        remove_tree(root)
    if root.parent.is_dir() and not any(root.parent.iterdir()):
        root.parent.rmdir()


def write_pending(
    stage_dir: Path, options: dict[str, Any], inputs: dict[str, str], key: str
) -> None:
    record = {"version": RECORD_VERSION, "key": key, "options": options, "inputs": inputs}
    write_json_atomic(stage_dir / PENDING, canonical(record))


def write_done(
    stage_dir: Path, options: dict[str, Any], inputs: dict[str, str], key: str, seconds: float
) -> dict[str, Any]:
    """Write `stage.json` with the stage's output fingerprint; remove the pending record."""
    content, files = folder_digests(stage_dir)
    output = fingerprint({"key": key, "content": content})
    record = {
        "version": RECORD_VERSION,
        "key": key,
        "options": options,
        "inputs": inputs,
        "output": output,
        "files": files,
        "seconds": round(seconds, 2),
    }
    write_json_atomic(stage_dir / RECORD, canonical(record))
    (stage_dir / PENDING).unlink(missing_ok=True)
    return record


def output_of(stage_dir: Path) -> str:
    return str(read_json(stage_dir / RECORD, "stage record")["output"])
