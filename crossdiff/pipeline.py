"""`crossdiff run`: tokens to report in one command, resuming whatever a previous run left.

Each stage writes one folder under the run directory and, when it has finished, a `stage.json`
recording its options, the fingerprints of its inputs and of its output (crossdiff.stage_record).
A re-run skips a finished stage whose options and inputs match, resumes an unfinished one (each
stage resumes on its own: checkpoints, shards), and redoes a stage whose options or inputs changed
together with every stage after it, as a build system does (it says what changed). All options
are checked before the first stage runs, and a lock file keeps a second process out of the folder.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.common import (
    CrossdiffError,
    add_runtime_arguments,
    check_output_dir,
    read_json,
    write_json_atomic,
)
from crossdiff.lock import folder_lock
from crossdiff.stage_runner import (
    BASE_STAGES,
    StageRunner,
    controls_enabled,
    crosscoder_seeds,
    stage_graph,
)
from crossdiff.validation import validate_run_options

STAGES = BASE_STAGES  # the stages --stop-after names; see stage_runner for the whole graph

# Options per preset and stage. `micro` is the reduced size the tests and CI examples run.
RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "data": {"source": "embedded", "preset": "tiny"},
        "models": {"preset": "tiny"},
        "store": {
            "pairing": "paper",
            "n_tokens": 300_000,
            "dtype": "float16",
            "heldout_fraction": 0.1,
        },
        "crosscoder": {
            "expansion": 8,
            "k": 32,
            "n_shared": 0,
            "shared_decoder": "free",
            "steps": 1200,
            "batch_size": 1024,
            # 1/32 (the anchors' weight) leaves a third of the latents dead in a run this short;
            # 0.25 brings that to about 4% at the same FVE (measured on the tiny store)
            "aux_loss_coefficient": 0.25,
        },
        "report": {"split": "paper", "max_tokens": 200_000},
    },
    # tiny's corpus and tokenizer, a larger and longer-trained pair (d_model 256), a 2,048-latent
    # crosscoder: sized for --controls --crosscoder-seeds 3 in about an hour on a 2-core CPU
    # (predicted 81 min; 87 CPU-minutes, 116 min on a shared machine: docs/findings.md)
    "small": {
        "data": {"source": "embedded", "preset": "tiny"},
        "models": {"preset": "small"},
        "store": {
            "pairing": "paper",
            "n_tokens": 300_000,
            "dtype": "float16",
            "heldout_fraction": 0.1,
        },
        "crosscoder": {
            "expansion": 8,
            "k": 32,
            "n_shared": 0,
            "shared_decoder": "free",
            "steps": 1000,
            "batch_size": 1024,
            "aux_loss_coefficient": 0.25,  # as tiny: keeps the dead fraction low in a short run
        },
        "report": {"split": "paper", "max_tokens": 200_000},
    },
    "micro": {
        "data": {"source": "embedded", "preset": "tiny", "n_chars_per_domain": 150_000},
        "models": {"preset": "tiny", "steps": 30, "checkpoint_every": 10, "eval_rows": 16},
        "store": {
            "pairing": "paper",
            "n_tokens": 12_000,
            "dtype": "float16",
            "heldout_fraction": 0.1,
        },
        "crosscoder": {
            "expansion": 4,
            "k": 8,
            "steps": 60,
            "batch_size": 256,
            "checkpoint_every": 20,
        },
        "report": {"split": "paper", "max_tokens": 12_000},
    },
    "paper": {
        "data": {"source": "hf", "preset": "paper"},
        "models": {"preset": "paper"},
        "store": {
            "pairing": "paper",
            "n_tokens": 100_000_000,
            "dtype": "bfloat16",
            "heldout_fraction": 0.1,
        },
        # the authors' fork of dictionary_learning (BatchTopKCrossCoderTrainer and its script);
        # docs/crosscoder.md, "The paper's settings", lists each value and its source
        "crosscoder": {
            "expansion": 32,
            "k": 300,
            # designated shared latents, one decoder vector for all models (the fork averages
            # them after every step); the count is not published: 10% of d_sae = 32 * 768
            "n_shared": 2457,
            "shared_decoder": "tied",
            "shared_penalty": "sparsity",
            "sparsity_coefficient": 1 / 32,
            "shared_sparsity_coefficient": 0.7 / 32,  # the paper's shared-to-exclusive 0.7
            "code_normalization": "mixed",
            "code_normalization_alpha": 0.7,
            "threshold_schedule": "ema",
            "threshold_beta": 0.999,
            "threshold_start_step": 1000,
            "aux_loss": "fork",
            "aux_loss_coefficient": 1 / 32,
            "dead_after_tokens": 10_000_000,
            "recon_loss": "l2",
            "b_dec_init": "geometric_median",
            "steps": 40_000,
            "batch_size": 2048,
            "lr": 1e-3,
            "lr_warmup_steps": 1000,
            "lr_decay_fraction": 0.0,
        },
        "report": {"split": "paper", "max_tokens": 2_000_000},
    },
}


# run-wide sections next to the stages' options: extra crosscoder seeds, and the controls
RUN_SECTIONS: dict[str, dict[str, Any]] = {
    "replicates": {"crosscoder_seeds": 1},
    "controls": {"enabled": False},
}


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

    options["replicates"]["crosscoder_seeds"] = N trains N crosscoders per pair (seeds seed ..
    seed + N - 1); options["controls"]["enabled"] also trains the same-architecture controls
    (see crossdiff.replication). The report then holds their comparison.

    Under torchrun the language models, the harvest and the crosscoder run data-parallel over
    all processes (docs/distributed.md); rank 0 prepares the data first, writes the stage
    records and the report, and returns the full summary (the other ranks stop after the
    crosscoder)."""
    from crossdiff.distributed import compute_device, dist_info

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
        if info.is_main:  # written once the options are accepted and the folder is ours
            write_json_atomic(
                out / "run.json", {"preset": preset, "seed": seed, "options": options}
            )
        return _run_stages(
            out, options, seed=seed, torch_device=torch_device, stop_after=stop_after
        )


ACTIVATIONS = ("store", "live")


def choose_activations(
    options: dict[str, dict[str, Any]], out: Path, requested: str | None, *, verbose: bool
) -> str:
    """'store' or 'live': the one asked for, else 'store' if its estimated size fits in 90% of
    the free disk under `out`, else 'live' (said aloud)."""
    import shutil

    from crossdiff.estimate import store_bytes

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
    from crossdiff.estimate import check_disk, device_spec, estimate_lines, estimate_run

    spec = device_spec(device)
    last = STAGES.index(stop_after) if stop_after else len(STAGES) - 1
    wanted = set(STAGES[: last + 1])
    # the extra seeds' and the controls' stages run with the crosscoder stage
    estimates = {
        k: v
        for k, v in estimate_run(options, spec).items()
        if k in wanted or (k not in STAGES and "crosscoder" in wanted)
    }
    for line in estimate_lines(estimates, spec):
        print(f"[crossdiff] {line}")
    check_disk(out, estimates)


def _run_stages(
    out: Path,
    options: dict[str, dict[str, Any]],
    *,
    seed: int,
    torch_device: Any,
    stop_after: str | None,
) -> RunSummary:
    from crossdiff.data import prepare_data
    from crossdiff.distributed import barrier, dist_info, main_process_first
    from crossdiff.models import train_language_models
    from crossdiff.replication import harvest_pair, train_pair_crosscoder, train_replicates

    info = dist_info()
    runner = StageRunner(out, stage_graph(options), info.is_main, barrier)
    # the runner times every stage it decides, done or skipped
    summary = RunSummary(out_dir=out, skipped=runner.skipped, stage_seconds=runner.seconds)

    # 1. corpus, tokenizer, token sets (prepare_data resumes and checks its own options)
    data_dir, data_done = runner.begin("data", {**options["data"], "seed": seed})
    with main_process_first():  # rank 0 builds the data; the other ranks then reuse it
        data = prepare_data(data_dir, seed=seed, **options["data"])
    if not data_done:
        runner.finish("data")
    if stop_after == "data":
        return summary

    # 2. dense and MoE language models on the same tokens
    models_dir, models_done = runner.begin("models", {**options["models"], "seed": seed})
    if not models_done:
        train_language_models(
            data.train,
            data.heldout,
            models_dir,
            tokenizer=data.tokenizer,
            seed=seed,
            device=str(torch_device),
            **options["models"],
        )
        runner.finish("models")
    eval_path = models_dir / "eval.json"
    if eval_path.exists():
        summary.metrics["language_models"] = read_json(eval_path, "model evaluation")
    if stop_after == "models":
        return summary

    # 3. paired activations
    main_pair = ((models_dir / "dense", "dense"), (models_dir / "moe", "moe"))
    store = harvest_pair(runner, "store", main_pair, options, data, seed, torch_device)
    if stop_after == "store":
        return summary

    # 4. crosscoders: the main one, one per extra seed, and the controls' (with --controls)
    crosscoder = train_pair_crosscoder(
        runner, "crosscoder", store, main_pair, options, data, seed, torch_device
    )
    train_replicates(runner, store, main_pair, options, data, seed, torch_device)
    if controls_enabled(options):
        from crossdiff.replication import run_controls

        run_controls(runner, models_dir, options, data, seed, torch_device)
    if stop_after == "crosscoder" or not info.is_main:
        return summary  # the report is one process's work

    # 5. feature diff and report (cheap: always redone, so it reflects the current code)
    _report(runner, summary, crosscoder, store, models_dir, options, data, seed, torch_device)
    return summary


def _report(
    runner: StageRunner,
    summary: RunSummary,
    crosscoder: Any,
    store: Any,
    models_dir: Path,
    options: dict[str, dict[str, Any]],
    data: Any,
    seed: int,
    torch_device: Any,
) -> None:
    from crossdiff.analysis import diff_features
    from crossdiff.report import write_report

    t0 = time.perf_counter()
    diff = diff_features(
        crosscoder,
        store,
        tokenizer=data.tokenizer,
        split=options["report"]["split"],
        max_tokens=options["report"]["max_tokens"],
    )
    spliced = _spliced_loss(crosscoder, store, models_dir, data.heldout, options, torch_device)
    if spliced is not None:
        diff.summary["spliced_loss"] = spliced
    if crosscoder_seeds(options) > 1 or controls_enabled(options):
        from crossdiff.replication import replication_summary

        diff.summary.update(replication_summary(runner.out, diff, options, data, seed))
    summary.report_paths = write_report(diff, runner.out / "report", models=models_dir)
    summary.stage_seconds["report"] = time.perf_counter() - t0
    runner.record_report({**options["report"], "seed": seed}, summary.stage_seconds["report"])
    summary.metrics["diff"] = diff.summary
    write_json_atomic(
        runner.out / "summary.json",
        {
            "stage_seconds": {k: round(v, 2) for k, v in summary.stage_seconds.items()},
            "skipped": summary.skipped,
            "report": {k: str(v) for k, v in summary.report_paths.items()},
        },
    )


def _spliced_loss(
    crosscoder: Any,
    store: Any,
    models_dir: Path,
    heldout: Any,
    options: dict[str, dict[str, Any]],
    device: Any,
) -> dict[str, Any] | None:
    """Each model's LM loss with its paired activations spliced from the crosscoder, on held-out
    rows the crosscoder never saw (`report.splice_sequences` of them; 0 turns it off)."""
    from crossdiff.crosscoder.splice import SPLICE_SEQUENCES, spliced_loss_for_run

    n_rows = int(options["report"].get("splice_sequences", SPLICE_SEQUENCES))
    return spliced_loss_for_run(
        crosscoder, store, models_dir, heldout, max_sequences=n_rows, device=device
    )


def _print_summary(summary: RunSummary) -> None:
    diff = summary.metrics.get("diff", {})
    print("\n=== crossdiff run summary ===")
    width = max((len(name) for name in summary.stage_seconds), default=0)
    for name, seconds in summary.stage_seconds.items():
        note = " (skipped: done earlier)" if name in summary.skipped else ""
        print(f"  {name:<{width}} {seconds:8.1f} s{note}")
    for line in _summary_lines(diff):
        print(f"  {line}")
    if "html" in summary.report_paths:
        print(f"  report: {summary.report_paths['html']}")


def _summary_lines(diff: dict[str, Any]) -> list[str]:
    lines = []
    recon = diff.get("reconstruction", {})
    if recon.get("fve_per_model"):
        per_model = ", ".join(f"{n}={v:.3f}" for n, v in recon["fve_per_model"].items())
        where = recon.get("evaluated_on", "analysed")
        pooled = recon.get("fve_pooled_normalized")
        pooled_text = f", pooled normalized {pooled:.3f}" if pooled is not None else ""
        lines.append(
            f"FVE per model on {diff.get('n_tokens')} {where} tokens: {per_model} "
            f"(overall raw {recon['fve']:.3f}{pooled_text})"
        )
    if recon.get("fve_topk_per_model"):
        per_model = ", ".join(f"{n}={v:.3f}" for n, v in recon["fve_topk_per_model"].items())
        lines.append(
            f"FVE with BatchTopK at k={recon['k']:g}: {per_model} (overall {recon['fve_topk']:.3f})"
        )
    if "l0" in recon:
        topk = f" (top-k: {recon['l0_topk']:.1f})" if recon.get("l0_topk") is not None else ""
        lines.append(f"L0: {recon['l0']:.1f}{topk}; dead fraction: {recon['dead_fraction']:.3f}")
    if diff.get("class_counts"):
        lines.append("classes: " + ", ".join(f"{k}={v}" for k, v in diff["class_counts"].items()))
    for claim in diff.get("claims", []):
        lines.append(f"claim: {claim['sentence']}")
        if claim.get("excluding_artifacts"):
            lines.append(f"  {claim['excluding_artifacts']['sentence']}")
    lines.extend(f"WARNING: {warning}" for warning in diff.get("warnings", []))
    lines.extend(_replication_lines(diff))
    from crossdiff.crosscoder.splice import summary_lines as spliced_loss_lines

    lines.extend(spliced_loss_lines(diff.get("spliced_loss")))
    return lines


def _replication_lines(diff: dict[str, Any]) -> list[str]:
    """The crosscoder seeds' spread of the class counts, and the claims beyond the controls."""
    lines = []
    replicates = diff.get("replicates")
    if replicates and replicates.get("n_seeds", 1) > 1:
        counts = replicates["figures"]["class_counts"]
        spread = ", ".join(
            f"{cls}={c['mean']:.1f}±{c['sd']:.1f}" for cls, c in counts.items() if c["mean"]
        )
        lines.append(f"over {replicates['n_seeds']} crosscoder seeds (mean±sd): {spread}")
    lines.extend(f"control: {s}" for s in (diff.get("controls") or {}).get("sentences", []))
    return lines


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="all stages, from the embedded corpus to report.html (resumes)",
        description=(
            "Build the corpus and tokenizer, train a dense and an MoE model on the same tokens, "
            "harvest their paired activations, train a crosscoder, and write the report. "
            "Each finished stage is skipped on a re-run, so an interrupted run resumes. Under "
            "torchrun --nproc_per_node N -m crossdiff run ..., the models, harvest and "
            "crosscoder run data-parallel over the N processes."
        ),
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(RUN_PRESETS),
        help=(
            "tiny: 2-core CPU in minutes; small: a larger pair (about an hour with --controls "
            "--crosscoder-seeds 3); micro: seconds (tests); paper: the seed paper on a GPU"
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run folder")
    parser.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage")
    parser.add_argument("--harvest-tokens", type=int, default=None, help="tokens to harvest")
    parser.add_argument("--lm-steps", type=int, default=None, help="language-model steps")
    parser.add_argument("--crosscoder-steps", type=int, default=None, help="crosscoder steps")
    parser.add_argument("--k", type=int, default=None, help="crosscoder BatchTopK k")
    parser.add_argument("--expansion", type=float, default=None, help="d_sae / d_model")
    parser.add_argument("--pairing", default=None, help="pairing preset name or TOML path")
    parser.add_argument(
        "--activations",
        choices=ACTIVATIONS,
        default=None,
        help=(
            "store: harvest to disk, then train; live: train from the models' activations "
            "computed on the fly (a small store is harvested for the report). Default: store "
            "if it fits on the disk by an estimate, else live"
        ),
    )
    parser.add_argument(
        "--controls",
        action="store_true",
        default=None,
        help=(
            "also train a second dense and a second MoE model (another init seed, the same "
            "tokens in the same order) and crosscoders for dense vs dense' and MoE vs MoE'; the "
            "report compares dense vs MoE with these same-architecture pairs"
        ),
    )
    parser.add_argument(
        "--crosscoder-seeds",
        type=int,
        default=None,
        metavar="N",
        help="train N crosscoders (seeds seed..seed+N-1) per pair; the report gives the spread",
    )
    parser.add_argument(
        "--splice-sequences",
        type=int,
        default=None,
        help="held-out rows for the spliced-in LM loss in the report (default 64; 0: off)",
    )
    add_runtime_arguments(parser)
    for action in parser._actions:
        if action.dest == "dtype":
            action.help = "the crosscoder's parameter dtype (default: float32)"
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    overrides = {
        "models": {"steps": args.lm_steps},
        "store": {"n_tokens": args.harvest_tokens, "pairing": args.pairing},
        "report": {"splice_sequences": args.splice_sequences},
        "replicates": {"crosscoder_seeds": args.crosscoder_seeds},
        "controls": {"enabled": args.controls},
        "crosscoder": {
            "steps": args.crosscoder_steps,
            "k": args.k,
            "expansion": args.expansion,
            # the crosscoder's parameter dtype; models and harvest keep their preset's dtypes
            "dtype": None if args.dtype == "float32" else args.dtype,
        },
    }
    summary = run_pipeline(
        args.out,
        args.preset,
        overrides=overrides,
        seed=args.seed,
        device=args.device,
        stop_after=args.stop_after,
        activations=args.activations,
    )
    from crossdiff.distributed import dist_info

    if dist_info().is_main:
        _print_summary(summary)
    return 0
