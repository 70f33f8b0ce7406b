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

from crossdiff import stage_record
from crossdiff.common import (
    CrossdiffError,
    add_runtime_arguments,
    check_output_dir,
    read_json,
    resolve_device,
    write_json_atomic,
)
from crossdiff.lock import folder_lock
from crossdiff.validation import validate_run_options

STAGES = ("data", "models", "store", "crosscoder", "report")
# the stages whose output each stage reads (their output fingerprints are its inputs)
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "data": (),
    "models": ("data",),
    "store": ("data", "models"),
    "crosscoder": ("store",),
    "report": ("data", "store", "crosscoder"),
}

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
    for stage, values in (overrides or {}).items():
        if stage not in options:
            raise CrossdiffError(f"unknown stage {stage!r} in overrides; stages are {STAGES}")
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
    harvests only a small store for the report (see _live_store_tokens); None chooses 'store'
    when the estimated store fits in 90% of the free disk, else 'live', and says so.

    Under torchrun the language models, the harvest and the crosscoder run data-parallel over
    all processes (docs/distributed.md); rank 0 prepares the data first, writes the stage
    records and the report, and returns the full summary (the other ranks stop after the
    crosscoder)."""
    from crossdiff.distributed import dist_info, rank_device

    if stop_after is not None and stop_after not in STAGES:
        raise CrossdiffError(f"--stop-after must be one of {STAGES}, got {stop_after!r}")
    options = resolve_options(preset, overrides)
    info = dist_info()
    torch_device = rank_device(device) if info.enabled else resolve_device(device)
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


def _live_store_tokens(options: dict[str, dict[str, Any]]) -> int:
    """Tokens of the small store a live run harvests for the report: its held-out part holds the
    documents live training left out (the split depends on the whole token set, not on how many
    tokens are harvested). Twice the report's max_tokens, at most the run's n_tokens."""
    n_tokens = int(options["store"]["n_tokens"])
    return min(n_tokens, 2 * int(options["report"].get("max_tokens", n_tokens)))


def _print_estimates(
    out: Path, options: dict[str, dict[str, Any]], device: Any, stop_after: str | None
) -> None:
    from crossdiff.estimate import check_disk, device_spec, estimate_lines, estimate_run

    spec = device_spec(device)
    last = STAGES.index(stop_after) if stop_after else len(STAGES) - 1
    estimates = {k: v for k, v in estimate_run(options, spec).items() if k in STAGES[: last + 1]}
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
    from crossdiff.activations import ActivationStore, harvest, load_pairing
    from crossdiff.analysis import diff_features
    from crossdiff.crosscoder import CrossCoder, CrossCoderConfig, train_crosscoder
    from crossdiff.crosscoder.config import store_widths
    from crossdiff.data import prepare_data
    from crossdiff.distributed import barrier, dist_info, main_process_first
    from crossdiff.models import load_model, train_language_models
    from crossdiff.report import write_report

    info = dist_info()
    summary = RunSummary(out_dir=out)
    outputs: dict[str, str] = {}  # stage -> its output fingerprint
    started: dict[str, tuple[dict[str, str], str]] = {}  # stage -> (its inputs, its key)

    def stage(name: str) -> tuple[Path, dict[str, Any], bool]:
        stage_dir = out / name
        stage_options = {**options[name], "seed": seed}
        inputs = {up: outputs[up] for up in STAGE_INPUTS[name]}
        later = list(STAGES[STAGES.index(name) + 1 :])
        reused = all(up in summary.skipped for up in STAGE_INPUTS[name])
        decision = stage_record.decide(
            name, stage_dir, stage_options, inputs, later, inputs_reused=reused
        )
        barrier()  # every rank has read the records before rank 0 changes them
        if info.is_main:
            print(f"[crossdiff] {name}: {decision.message}")
            if decision.action == "redo":
                removed = stage_record.clear([stage_dir] + [out / s for s in later])
                if removed:
                    print(f"[crossdiff] removed {', '.join(str(p) for p in removed)}")
            if decision.action == "adopt":  # give the older record its fingerprints
                seconds = float(decision.record.get("seconds", 0.0))
                stage_record.write_done(stage_dir, stage_options, inputs, decision.key, seconds)
            if not decision.done:
                stage_record.write_pending(stage_dir, stage_options, inputs, decision.key)
        barrier()
        if decision.done:
            summary.skipped.append(name)
            outputs[name] = stage_record.output_of(stage_dir)
        started[name] = (inputs, decision.key)
        return stage_dir, stage_options, decision.done

    def mark_done(stage_dir: Path, stage_options: dict[str, Any], seconds: float) -> None:
        name = stage_dir.name
        inputs, key = started[name]
        if info.is_main:
            stage_record.write_done(stage_dir, stage_options, inputs, key, seconds)
        barrier()  # the record (and its output fingerprint) is on disk for every rank
        outputs[name] = stage_record.output_of(stage_dir)

    # 1. corpus, tokenizer, token sets (prepare_data resumes and checks its own options)
    data_dir, data_opts, data_done = stage("data")
    t0 = time.perf_counter()
    data_kwargs = {k: v for k, v in data_opts.items() if k != "seed"}
    with main_process_first():  # rank 0 builds the data; the other ranks then reuse it
        data = prepare_data(data_dir, seed=seed, **data_kwargs)
    if not data_done:
        mark_done(data_dir, data_opts, time.perf_counter() - t0)
    summary.stage_seconds["data"] = time.perf_counter() - t0
    if stop_after == "data":
        return summary

    # 2. dense and MoE language models on the same tokens
    models_dir, models_opts, models_done = stage("models")
    t0 = time.perf_counter()
    if not models_done:
        model_kwargs = {k: v for k, v in models_opts.items() if k != "seed"}
        train_language_models(
            data.train,
            data.heldout,
            models_dir,
            tokenizer=data.tokenizer,
            seed=seed,
            device=str(torch_device),
            **model_kwargs,
        )
        mark_done(models_dir, models_opts, time.perf_counter() - t0)
    summary.stage_seconds["models"] = time.perf_counter() - t0
    eval_path = models_dir / "eval.json"
    if eval_path.exists():
        summary.metrics["language_models"] = read_json(eval_path, "model evaluation")
    if stop_after == "models":
        return summary

    # 3. paired activations
    store_dir, store_opts, store_done = stage("store")
    t0 = time.perf_counter()
    live = store_opts.get("activations") == "live"
    if not store_done:
        dense = load_model(models_dir / "dense", device=str(torch_device))
        moe = load_model(models_dir / "moe", device=str(torch_device))
        harvest(
            dense,
            moe,
            data.train,
            load_pairing(store_opts["pairing"]),
            store_dir,
            n_tokens=_live_store_tokens(options) if live else store_opts["n_tokens"],
            dtype=store_opts["dtype"],
            model_names=("dense", "moe"),
            device=str(torch_device),
            resume=True,
            heldout_fraction=store_opts.get("heldout_fraction", 0.1),
            split_seed=seed,
            model_dtype=store_opts.get("model_dtype"),  # default: bfloat16 on CUDA
        )
        mark_done(store_dir, store_opts, time.perf_counter() - t0)
    store = ActivationStore(store_dir)
    summary.stage_seconds["store"] = time.perf_counter() - t0
    if stop_after == "store":
        return summary

    # 4. crosscoder
    cc_dir, cc_opts, cc_done = stage("crosscoder")
    t0 = time.perf_counter()
    if cc_done:
        crosscoder = CrossCoder.load(cc_dir)
    else:
        cc_kwargs = dict(cc_opts)
        cc_kwargs.pop("seed")
        expansion = cc_kwargs.pop("expansion")
        cfg = CrossCoderConfig(
            n_models=store.n_models,
            d_model=store.d_model,
            d_models=store_widths(store),
            d_sae=int(expansion * store.d_model),
            k=cc_kwargs.pop("k"),
            n_shared=cc_kwargs.pop("n_shared", 0),
            shared_decoder=cc_kwargs.pop("shared_decoder", "free"),
            dtype=cc_kwargs.pop("dtype", "float32"),
            **(
                {"shared_penalty_ratio": cc_kwargs.pop("shared_penalty_ratio")}
                if "shared_penalty_ratio" in cc_kwargs
                else {}
            ),
        )
        crosscoder = train_crosscoder(
            _live_source(store_opts, data, models_dir, seed, torch_device) if live else store,
            cfg,
            seed=seed,
            device=str(torch_device),
            checkpoint_dir=cc_dir / "checkpoints",
            resume=True,
            **cc_kwargs,
        )
        if info.is_main:
            crosscoder.save(cc_dir)
        mark_done(cc_dir, cc_opts, time.perf_counter() - t0)
    summary.stage_seconds["crosscoder"] = time.perf_counter() - t0
    if stop_after == "crosscoder" or not info.is_main:
        return summary  # the report is one process's work

    # 5. feature diff and report (cheap: always redone, so it reflects the current code)
    report_dir = out / "report"
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
    summary.report_paths = write_report(diff, report_dir, models=models_dir)
    report_options = {**options["report"], "seed": seed}
    report_inputs = {up: outputs[up] for up in STAGE_INPUTS["report"]}
    report_key = stage_record.stage_key(report_options, report_inputs)
    seconds = time.perf_counter() - t0
    stage_record.write_done(report_dir, report_options, report_inputs, report_key, seconds)
    summary.stage_seconds["report"] = time.perf_counter() - t0
    summary.metrics["diff"] = diff.summary
    write_json_atomic(
        out / "summary.json",
        {
            "stage_seconds": {k: round(v, 2) for k, v in summary.stage_seconds.items()},
            "skipped": summary.skipped,
            "report": {k: str(v) for k, v in summary.report_paths.items()},
        },
    )
    return summary


def _live_source(
    store_opts: dict[str, Any], data: Any, models_dir: Path, seed: int, device: Any
) -> Any:
    """The live activations of the store stage's harvest (same tokens, split and dtype)."""
    from crossdiff.activations import load_pairing
    from crossdiff.activations.live import LiveActivations
    from crossdiff.models import load_model

    return LiveActivations(
        load_model(models_dir / "dense", device=str(device)),
        load_model(models_dir / "moe", device=str(device)),
        data.train,
        load_pairing(store_opts["pairing"]),
        n_tokens=store_opts["n_tokens"],
        dtype=store_opts["dtype"],
        model_names=("dense", "moe"),
        device=str(device),
        heldout_fraction=store_opts.get("heldout_fraction", 0.1),
        split_seed=seed,
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
    for name, seconds in summary.stage_seconds.items():
        note = " (skipped: done earlier)" if name in summary.skipped else ""
        print(f"  {name:<11} {seconds:8.1f} s{note}")
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
    from crossdiff.crosscoder.splice import summary_lines as spliced_loss_lines

    lines.extend(spliced_loss_lines(diff.get("spliced_loss")))
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
        help="tiny: 2-core CPU in minutes; micro: seconds (tests); paper: the seed paper on a GPU",
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
