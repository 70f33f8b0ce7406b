"""Rewrite the module paths that issue 28's renovation moved, in files written against the old tree.

A branch started before the renovation imports `crossdiff.common`, `crossdiff.pipeline`,
`crossdiff.crosscoder.trainer`, ...; after merging it, run this over the files it touched (or the
whole tree: paths already new are left alone):

    python scripts/rewrite_moved_imports.py $(git diff --name-only main...BRANCH)

It rewrites dotted paths (`crossdiff.common`, also in strings such as monkeypatch targets), file
paths (`crossdiff/common.py`) and `from crossdiff import common`. Then run ruff (import order).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MOVED = {  # old -> new, under crossdiff.
    "common": "plumbing.common",
    "fingerprint": "plumbing.fingerprint",
    "integrity": "plumbing.integrity",
    "lock": "plumbing.lock",
    "lazy": "plumbing.lazy",
    "distributed": "plumbing.distributed",
    "api_checks": "plumbing.api_checks",
    "stage_config": "plumbing.stage_config",
    "run_presets": "plumbing.presets",
    "cli_presets": "plumbing.preset_args",
    "lens_models": "models.by_name",
    "lens": "integrations.lens",
    "sae_lens_hook": "integrations.sae_lens_hook",
    "pipeline": "run.pipeline",
    "run_command": "run.command",
    "run_summary": "run.summary",
    "run_checks": "run.validation_targets",
    "replication": "run.replication",
    "stage_runner": "run.stage_graph",
    "stage_record": "run.stage_record",
    "validation": "run.validation",
    "estimate": "run.estimate",
    "crosscoder.trainer": "crosscoder.train",
    "crosscoder.training": "crosscoder.training_sae",
    "crosscoder.saelens_trainer": "crosscoder.sae_trainer",
    "crosscoder.plan": "crosscoder.training_plan",
    "crosscoder.sources": "crosscoder.training_batches",
    "crosscoder.splice_batched": "crosscoder.spliced_forwards",
    "crosscoder.splice": "crosscoder.spliced_loss",
    "crosscoder.loading": "crosscoder.disk_loader",
    "activations.shards": "activations.checked_files",
    "activations.sharded": "activations.harvest_ranks",
    "activations.writer": "activations.store_writer",
    "activations.folder": "activations.harvest_folder",
    "activations.layout": "activations.store_layout",
    "activations.job": "activations.harvest_job",
}
# names that moved to another module in the renovation, not with their module
NOTES = {
    "mark_written_by": "crossdiff.plumbing.stage_marker (crossdiff.run.stage_record re-exports it)",
    "check_activations": "crossdiff.activations.source",
}


def _rules() -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for old, new in MOVED.items():
        rules.append(
            (re.compile(rf"(?<![\w.])crossdiff\.{re.escape(old)}(?!\w)"), f"crossdiff.{new}")
        )
        old_path, new_path = old.replace(".", "/"), new.replace(".", "/")
        rules.append(
            (
                re.compile(rf"(?<![\w/.])crossdiff/{re.escape(old_path)}\.py\b"),
                f"crossdiff/{new_path}.py",
            )
        )
    return rules


def _from_import(match: re.Match[str]) -> str:
    name, alias = match.group(1), match.group(2) or ""
    if name not in MOVED or "." in name:
        return match.group(0)
    package, _, module = MOVED[name].rpartition(".")
    if not alias and module != name:
        alias = f" as {name}"
    return f"from crossdiff.{package} import {module}{alias}"


def rewrite(text: str) -> str:
    for pattern, replacement in _rules():
        text = pattern.sub(replacement, text)
    return re.sub(
        r"from crossdiff import (\w+)( as \w+)?(?=\s*(?:#|$))", _from_import, text, flags=re.M
    )


def main(paths: list[str]) -> int:
    changed = 0
    for name in paths:
        path = Path(name)
        if not path.is_file():
            continue
        text = path.read_text()
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            changed += 1
            print(f"rewrote {path}")
        for moved, home in NOTES.items():
            if re.search(rf"import[^\n]*\b{moved}\b", new):
                print(f"{path}: {moved} now lives in {home}; check its import")
    print(f"{changed} file(s) rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
