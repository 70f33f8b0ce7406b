"""`crossdiff run`: tokens to report in one command, resuming whatever a previous run left.

Each stage writes one folder under the run directory and, when it has finished, a `stage.json`
recording its options, the fingerprints of its inputs and of its output
(crossdiff.run.stage_record).
A re-run skips a finished stage whose options and inputs match, resumes an unfinished one (each
stage resumes on its own: checkpoints, shards), and redoes a stage whose options or inputs changed
together with every stage after it, as a build system does (it says what changed). All options
are checked before the first stage runs, and a lock file keeps a second process out of the folder.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import (
    CrossdiffError,
    check_output_dir,
    read_json,
    write_json_atomic,
)
from crossdiff.plumbing.lock import folder_lock
from crossdiff.plumbing.presets import RUN_PRESETS, RUN_SECTIONS
from crossdiff.run.stage_graph import (
    BASE_STAGES,
    StageRunner,
    crosscoder_seeds,
    model_seeds,
    stage_graph,
)
from crossdiff.run.summary import _print_summary, _summary_lines  # noqa: F401 (re-exported)
from crossdiff.run.validation import validate_run_options

STAGES = BASE_STAGES  # the stages --stop-after names; see stage_graph for the whole graph


@dataclass
class RunSummary:
    out_dir: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    report_paths: dict[str, Path] = field(default_factory=dict)


def resolve_options(
    preset: str, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    if preset not in RUN_PRESETS:
        raise CrossdiffError(f"unknown preset {preset!r}; known presets: {sorted(RUN_PRESETS)}")
    options = copy.deepcopy(RUN_PRESETS[preset])
    for section, defaults in RUN_SECTIONS.items():
        options.setdefault(section, dict(defaults))
    for stage, values in (overrides or {}).items():
        if stage not in options:
            raise CrossdiffError(
                f"unknown stage {stage!r} in overrides; stages are {STAGES} (and the sections "
                f"{tuple(RUN_SECTIONS)})"
            )
        options[stage].update({k: v for k, v in values.items() if v is not None})
    return options


def run_pipeline(
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    device: str = "auto",
    stop_after: str | None = None,
    activations: str | None = None,
) -> RunSummary:
    """Run every stage into `out_dir`; see the module docstring for resume semantics.

    activations: 'store' harvests the paired activations into a store on disk and trains from
    it; 'live' trains from the models' activations computed on the fly (LiveActivations) and
    harvests only a small store for the report (see replication.live_store_tokens); None
    chooses 'store' when the estimated store fits in 90% of the free disk, else 'live'.

    options["replicates"]["crosscoder_seeds"] = C trains C crosscoders per pair (seeds seed ..
    seed + C - 1); options["model_seeds"]["n"] = N trains N dense and N MoE models and C joint
    crosscoders over all 2N (see crossdiff.run.replication). The report then holds their seed
    stability and the claims about the architectures over model seeds.

    Under torchrun the language models, the harvest and the crosscoder run data-parallel over
    all processes (docs/distributed.md); rank 0 prepares the data first, writes the stage
    records and the report, and returns the full summary (the other ranks stop after the
    crosscoder)."""
    from crossdiff.plumbing.distributed import compute_device, dist_info

    if stop_after is not None and stop_after not in STAGES:
        raise CrossdiffError(f"--stop-after must be one of {STAGES}, got {stop_after!r}")
    options = resolve_options(preset, overrides)
    info = dist_info()
    torch_device = compute_device(device)
    validate_run_options(options, seed=seed, device=torch_device, world_size=info.world_size)
    out = Path(out_dir)
    check_output_dir(out)  # before the folder is made: a bad --out leaves nothing
    if choose_activations(options, out, activations, verbose=info.is_main) == "live":
        options["store"]["activations"] = "live"  # only then: store-path records keep their keys
    if info.is_main:  # predicted time and disk; a store that cannot fit is refused here
        _print_estimates(out, options, torch_device, stop_after)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out / "run.lock", f"run folder {out}", enabled=info.is_main):
        # written once the options are accepted, the folder is ours and the data stage has
        # checked the store's n_tokens against its token set (a refused run leaves the old one)
        record = run_record(out, preset, seed, options, stop_after)
        return _run_stages(
            out, options, seed=seed, torch_device=torch_device, stop_after=stop_after,
            record=record,
        )  # fmt: skip


ACTIVATIONS = ("store", "live")
# the option sections of run.json that belong to the stages after each --stop-after stage
_LATER_SECTIONS = {
    "data": ("models", "store", "crosscoder", "replicates", "controls", "report"),
    "models": ("store", "crosscoder", "replicates", "controls", "report"),
    "store": ("crosscoder", "replicates", "controls", "report"),
    "crosscoder": ("report",),
}


def run_record(
    out: Path, preset: str, seed: int, options: dict[str, Any], stop_after: str | None
) -> dict[str, Any]:
    """What run.json says: the options of every stage this run makes; with --stop-after, the
    stages after it keep the options of the previous run.json (their folders are left as they
    were), so run.json never runs ahead of the folders."""
    record: dict[str, Any] = {"preset": preset, "seed": seed, "options": copy.deepcopy(options)}
    later = _LATER_SECTIONS.get(stop_after or "", ())
    if not later:
        return record
    previous = {}
    if (out / "run.json").exists():
        previous = read_json(out / "run.json", "run record").get("options", {})
    for section in later:
        if section in previous:
            record["options"][section] = previous[section]
        else:  # never made in this folder
            record["options"].pop(section, None)
    record["stopped_after"] = stop_after
    return record


def choose_activations(
    options: dict[str, dict[str, Any]], out: Path, requested: str | None, *, verbose: bool
) -> str:
    """'store' or 'live': the one asked for, else 'store' if its estimated size fits in 90% of
    the free disk under `out`, else 'live' (said aloud)."""
    import shutil

    from crossdiff.run.estimate import store_bytes

    if requested is not None:
        if requested not in ACTIVATIONS:
            raise CrossdiffError(f"activations={requested!r}; expected one of {ACTIVATIONS}")
        return requested
    store = {k: v for k, v in options["store"].items() if k != "activations"}
    need = store_bytes({**options, "store": store})
    where = next(p for p in (out, *out.parents) if p.exists())  # out may not exist yet
    free = shutil.disk_usage(where).free
    choice = "store" if need <= 0.9 * free else "live"
    if verbose:
        reason = "fits" if choice == "store" else "does not fit"
        print(
            f"[crossdiff] activations: {choice} (a store of {store['n_tokens']} tokens needs "
            f"about {need / 2**30:.2f} GiB, which {reason} in 90% of the {free / 2**30:.1f} GiB "
            f"free under {out}; choose with --activations store|live)"
        )
    return choice


def _print_estimates(
    out: Path, options: dict[str, dict[str, Any]], device: Any, stop_after: str | None
) -> None:
    from crossdiff.run.estimate import check_disk, device_spec, estimate_lines, estimate_run

    spec = device_spec(device)
    last = STAGES.index(stop_after) if stop_after else len(STAGES) - 1
    wanted = set(STAGES[: last + 1])
    # the extra seeds' and model seeds' stages run with the crosscoder stage
    estimates = {
        k: v
        for k, v in estimate_run(options, spec).items()
        if k in wanted or (k not in STAGES and "crosscoder" in wanted)
    }
    for line in estimate_lines(estimates, spec):
        print(f"[crossdiff] {line}")
    check_disk(out, estimates)


@dataclass
class _Run:
    """What the stages of one run share: the runner, the options and what earlier stages made."""

    runner: StageRunner
    options: dict[str, dict[str, Any]]
    seed: int
    device: Any
    summary: RunSummary
    made: dict[str, Any] = field(default_factory=dict)  # stage name -> what its run returned
    record: dict[str, Any] | None = None  # run.json, written once the data stage is checked

    @property
    def models_dir(self) -> Path:
        return self.runner.out / "models"

    def main_pair(self) -> Any:
        return ((self.models_dir / "dense", "dense"), (self.models_dir / "moe", "moe"))


def _data_stage(run: _Run) -> None:
    """The corpus, tokenizer and token sets (prepare_data resumes and checks its own options)."""
    from crossdiff.data.stage import DataStageConfig, run_data_stage
    from crossdiff.plumbing.distributed import main_process_first

    data_dir, done = run.runner.begin("data", {**run.options["data"], "seed": run.seed})
    config = DataStageConfig.from_options(run.options["data"])
    with main_process_first():  # rank 0 builds the data; the other ranks then reuse it
        run.made["data"] = run_data_stage(config, None, data_dir, seed=run.seed)
    from crossdiff.run.validation_targets import check_store_tokens

    # before a later stage is redone (and before a redone data stage drops what it replaces)
    check_store_tokens(run.options, run.made["data"])
    if not done:
        run.runner.finish("data")
    if run.record is not None and run.runner.is_main:
        write_json_atomic(run.runner.out / "run.json", run.record)


def _models_stage(run: _Run) -> None:
    """The dense and MoE language models on the same tokens."""
    from crossdiff.models.stage import ModelsStageConfig, run_models_stage

    models_dir, done = run.runner.begin("models", {**run.options["models"], "seed": run.seed})
    if not done:
        config = ModelsStageConfig.from_options(run.options["models"])
        run_models_stage(config, run.made["data"], models_dir, seed=run.seed, device=run.device)
        run.runner.finish("models")
    if (models_dir / "eval.json").exists():
        eval_json = read_json(models_dir / "eval.json", "model evaluation")
        run.summary.metrics["language_models"] = eval_json


def _store_stage(run: _Run) -> None:
    """The main pair's paired activations."""
    from crossdiff.run.replication import harvest_pair

    run.made["store"] = harvest_pair(
        run.runner, "store", run.main_pair(), run.options, run.made["data"], run.seed, run.device
    )


def _crosscoder_stage(run: _Run) -> None:
    """The crosscoders: the main one, one per extra seed, and with --model-seeds N the other
    seeds' models and stores and the joint crosscoders over all 2N models."""
    from crossdiff.run.replication import run_model_seeds, train_pair_crosscoder, train_replicates

    args = (run.main_pair(), run.options, run.made["data"], run.seed, run.device)
    store = run.made["store"]
    run.made["crosscoder"] = train_pair_crosscoder(run.runner, "crosscoder", store, *args)
    train_replicates(run.runner, store, *args)
    if model_seeds(run.options) > 1:
        run_model_seeds(run.runner, run.options, run.made["data"], run.seed, run.device)


def _report_stage(run: _Run) -> None:
    """The feature diff and report (cheap: always redone, so it reflects the current code)."""
    from crossdiff.report.stage import ReportInputs, ReportStageConfig, run_report_stage

    t0 = time.perf_counter()
    options, data, summary = run.options, run.made["data"], run.summary
    extra = None
    if crosscoder_seeds(options) > 1 or model_seeds(options) > 1:
        from crossdiff.run.replication import replication_summary

        def extra(diff: Any) -> dict[str, Any]:
            return replication_summary(run.runner.out, diff, options, data, run.seed)

    inputs = ReportInputs(
        run.made["crosscoder"], run.made["store"], data.tokenizer, run.models_dir, data.heldout,
        extra_summary=extra, cache_dir=run.runner.out / "cache" / "splice",
    )  # fmt: skip
    config = ReportStageConfig.from_options(options["report"])
    diff, summary.report_paths = run_report_stage(
        config, inputs, run.runner.out / "report", device=run.device
    )
    summary.stage_seconds["report"] = time.perf_counter() - t0
    run.runner.record_report(
        {**options["report"], "seed": run.seed}, summary.stage_seconds["report"]
    )
    summary.metrics["diff"] = diff.summary
    write_json_atomic(
        run.runner.out / "summary.json",
        {
            "stage_seconds": {k: round(v, 2) for k, v in summary.stage_seconds.items()},
            "skipped": summary.skipped,
            "report": {k: str(v) for k, v in summary.report_paths.items()},
        },
    )


# each base stage of `crossdiff run`, in order, and the function that runs it (with the stages
# the graph adds next to it: the extra seeds' and the model seeds' run with "crosscoder")
STAGE_STEPS = (
    ("data", _data_stage),
    ("models", _models_stage),
    ("store", _store_stage),
    ("crosscoder", _crosscoder_stage),
    ("report", _report_stage),
)


def _run_stages(
    out: Path,
    options: dict[str, dict[str, Any]],
    *,
    seed: int,
    torch_device: Any,
    stop_after: str | None,
    record: dict[str, Any] | None = None,
) -> RunSummary:
    from crossdiff.plumbing.distributed import barrier, dist_info

    info = dist_info()
    runner = StageRunner(out, stage_graph(options), info.is_main, barrier)
    # the runner times every stage it decides, done or skipped
    summary = RunSummary(out_dir=out, skipped=runner.skipped, stage_seconds=runner.seconds)
    run = _Run(runner, options, seed, torch_device, summary, record=record)
    for name, step in STAGE_STEPS:
        if name == "report" and not info.is_main:
            break  # the report is one process's work
        try:
            step(run)
        except BaseException:
            runner.failed()
            raise
        if name == stop_after:
            break
    return summary
