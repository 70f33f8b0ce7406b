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
- a folder without records (an older crossdiff): the stage resumes under its own checks.

The output fingerprint hashes the key with what the stage wrote, so a stage redone with other
options always hands a new fingerprint to the stages after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.common import read_json, remove_tree, write_json_atomic
from crossdiff.fingerprint import canonical, describe_changes, fingerprint, folder_fingerprint

RECORD = "stage.json"
PENDING = ".stage.pending.json"  # a dot file: a store folder must hold only store files
RECORD_VERSION = 2


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


def write_pending(
    stage_dir: Path, options: dict[str, Any], inputs: dict[str, str], key: str
) -> None:
    record = {"version": RECORD_VERSION, "key": key, "options": options, "inputs": inputs}
    write_json_atomic(stage_dir / PENDING, canonical(record))


def write_done(
    stage_dir: Path, options: dict[str, Any], inputs: dict[str, str], key: str, seconds: float
) -> dict[str, Any]:
    """Write `stage.json` with the stage's output fingerprint; remove the pending record."""
    output = fingerprint({"key": key, "content": folder_fingerprint(stage_dir)})
    record = {
        "version": RECORD_VERSION,
        "key": key,
        "options": options,
        "inputs": inputs,
        "output": output,
        "seconds": round(seconds, 2),
    }
    write_json_atomic(stage_dir / RECORD, canonical(record))
    (stage_dir / PENDING).unlink(missing_ok=True)
    return record


def output_of(stage_dir: Path) -> str:
    return str(read_json(stage_dir / RECORD, "stage record")["output"])
