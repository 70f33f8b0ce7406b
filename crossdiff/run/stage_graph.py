"""The stage bookkeeping of `crossdiff run`: which stages exist for a run's options, what each
reads, and when each is reused, resumed or redone (records in crossdiff.run.stage_record).

The stage graph is built from the options: the five base stages, plus, with
`replicates.crosscoder_seeds` C > 1, one crosscoder stage per extra seed, and with
`model_seeds.n` N > 1, per extra model seed i its dense and MoE models (`models-seed<i>`) and
their paired store (`store-seed<i>`), and the joint crosscoders over all 2N models
(`joint-crosscoder`, one per crosscoder seed). Redoing a stage redoes every stage that reads it,
directly or not, and nothing else: changing the crosscoder's options retrains every crosscoder,
never the models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.run import stage_record

BASE_STAGES = ("data", "models", "store", "crosscoder", "report")


def crosscoder_seeds(options: dict[str, dict[str, Any]]) -> int:
    return int(options.get("replicates", {}).get("crosscoder_seeds", 1))


def model_seeds(options: dict[str, dict[str, Any]]) -> int:
    return int(options.get("model_seeds", {}).get("n", 1))


def seed_suffix(index: int) -> str:
    """'' for the first crosscoder seed (its folder keeps the plain name), '-seed<i>' after."""
    return "" if index == 0 else f"-seed{index}"


def stage_graph(options: dict[str, dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """Stage name -> the stages whose output it reads, in the order the stages run."""
    n_seeds = crosscoder_seeds(options)
    graph: dict[str, tuple[str, ...]] = {
        "data": (),
        "models": ("data",),
        "store": ("data", "models"),
    }
    crosscoders = [f"crosscoder{seed_suffix(i)}" for i in range(n_seeds)]
    graph.update({name: ("store",) for name in crosscoders})
    stores = ["store"]
    if model_seeds(options) > 1:
        for i in range(1, model_seeds(options)):
            graph[f"models-seed{i}"] = ("data",)
            graph[f"store-seed{i}"] = ("data", f"models-seed{i}")
            stores.append(f"store-seed{i}")
        for i in range(n_seeds):
            graph[f"joint-crosscoder{seed_suffix(i)}"] = tuple(stores)
            crosscoders.append(f"joint-crosscoder{seed_suffix(i)}")
    graph["report"] = ("data", *stores, *crosscoders)
    return graph


def dependents(graph: dict[str, tuple[str, ...]], name: str) -> list[str]:
    """Every stage that reads `name`'s output, directly or through others, in run order."""
    found: set[str] = set()
    frontier = {name}
    while frontier:
        frontier = {s for s, ins in graph.items() if set(ins) & frontier and s not in found}
        found |= frontier
    return [s for s in graph if s in found]


@dataclass
class StageRunner:
    """Decides each stage from its records and writes them; `outputs` holds the output
    fingerprints of the stages finished or reused so far (the inputs of the later ones)."""

    out: Path
    graph: dict[str, tuple[str, ...]]
    is_main: bool
    barrier: Any
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    started: dict[str, tuple[dict[str, Any], dict[str, str], str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # each stage's wall time this run
    _clock: dict[str, float] = field(default_factory=dict)

    def begin(self, name: str, stage_options: dict[str, Any]) -> tuple[Path, bool]:
        """(the stage's folder, whether it is already done); clears it and what reads it when
        its options or inputs changed."""
        self._clock[name] = time.perf_counter()
        stage_dir = self.out / name
        ins = self.graph[name]
        inputs = {up: self.outputs[up] for up in ins}
        later = dependents(self.graph, name)
        reused = all(up in self.skipped for up in ins)
        decision = stage_record.decide(
            name, stage_dir, stage_options, inputs, later, inputs_reused=reused
        )
        self.barrier()  # every rank has read the records before rank 0 changes them
        if self.is_main:
            print(f"[crossdiff] {name}: {decision.message}")
            if decision.action == "redo":
                folders = [stage_dir] + [self.out / s for s in later]
                aside = stage_record.aside_dir(self.out, name)
                kept_before = aside.exists()  # an earlier redo's: these are unfinished
                moved = stage_record.move_aside(self.out, name, folders)
                if moved and not kept_before:
                    print(
                        f"[crossdiff] moved {', '.join(str(p) for p in moved)} aside to {aside} "
                        f"(put back if {name} fails before writing anything, removed once it "
                        "has finished)"
                    )
                elif moved:
                    print(f"[crossdiff] removed {', '.join(str(p) for p in moved)}")
            if decision.action == "adopt":  # give the older record its fingerprints
                seconds = float(decision.record.get("seconds", 0.0))
                stage_record.write_done(stage_dir, stage_options, inputs, decision.key, seconds)
            if not decision.done:
                stage_record.write_pending(stage_dir, stage_options, inputs, decision.key)
        self.barrier()
        if decision.done:
            self.skipped.append(name)
            self.outputs[name] = stage_record.output_of(stage_dir)
            self.seconds[name] = time.perf_counter() - self._clock[name]
        self.started[name] = (stage_options, inputs, decision.key)
        return stage_dir, decision.done

    def finish(self, name: str) -> None:
        """Write the finished stage's record; its output fingerprint becomes an input."""
        stage_options, inputs, key = self.started[name]
        seconds = self.seconds[name] = time.perf_counter() - self._clock[name]
        if self.is_main:
            stage_record.write_done(self.out / name, stage_options, inputs, key, seconds)
            stage_record.drop_aside(self.out, name)
        self.barrier()  # the record (and its output fingerprint) is on disk for every rank
        self.outputs[name] = stage_record.output_of(self.out / name)

    def failed(self) -> None:
        """A stage raised: put back what the redo of each unfinished stage moved aside when it
        has written nothing yet; else say where the previous results are kept."""
        if not self.is_main:
            return
        for name in self.started:
            if name in self.outputs or not stage_record.aside_dir(self.out, name).exists():
                continue
            restored = stage_record.restore_aside(self.out, name)
            if restored:
                print(
                    f"[crossdiff] {name} failed before writing anything: put back "
                    f"{', '.join(str(p) for p in restored)} as they were"
                )
            else:
                print(
                    f"[crossdiff] {name} failed after writing into {self.out / name}; the "
                    f"results it replaces stay in {stage_record.aside_dir(self.out, name)} "
                    "until it finishes (a re-run resumes it)"
                )

    def record_report(self, stage_options: dict[str, Any], seconds: float) -> None:
        """The report is always redone (it is cheap and reflects the current code): its record
        says what it was made from."""
        inputs = {up: self.outputs[up] for up in self.graph["report"]}
        key = stage_record.stage_key(stage_options, inputs)
        stage_record.write_done(self.out / "report", stage_options, inputs, key, seconds)
