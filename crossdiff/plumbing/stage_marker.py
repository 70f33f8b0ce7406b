"""The stage record's file names, and the mark a stage subcommand leaves on a `crossdiff run` stage
folder it writes into, so the run never takes that folder for its own.

The records themselves (when a stage is reused, resumed or redone) are crossdiff.run.stage_record;
the names and the mark are here because the stages' subcommands (crossdiff harvest,
crossdiff train-crosscoder) write them too, and a stage never imports crossdiff.run.
"""

from __future__ import annotations

from pathlib import Path

from crossdiff.plumbing.common import read_json, write_json_atomic
from crossdiff.plumbing.fingerprint import canonical

RECORD = "stage.json"
PENDING = ".stage.pending.json"  # a dot file: a store folder must hold only store files
RECORD_VERSION = 2


def mark_written_by(stage_dir: str | Path, command: str) -> bool:
    """A stage subcommand writing into a run's stage folder (one with a stage record) marks its
    record `written_by` first, so `crossdiff run` never takes the files for the ones it made
    (it refuses to reuse the folder, naming the command). True if the folder had a record."""
    stage_dir = Path(stage_dir)
    records = [stage_dir / RECORD, stage_dir / PENDING]
    present = [p for p in records if p.exists()]
    if not present:
        return False
    previous = read_json(present[0], "stage record")
    if previous.get("written_by"):
        return True
    record = {"version": RECORD_VERSION, "written_by": command, "previous": previous}
    write_json_atomic(stage_dir / RECORD, canonical(record))
    (stage_dir / PENDING).unlink(missing_ok=True)
    print(
        f"note: {stage_dir} is a stage of a crossdiff run; its {RECORD} now says it was written "
        f"by `{command}`, so `crossdiff run` will not reuse it as its own"
    )
    return True
