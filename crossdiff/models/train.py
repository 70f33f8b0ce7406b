"""One trainer for both language models on the identical token stream.

Batch `s` is the same rows for the dense and the MoE model (a seeded permutation per epoch), so
the only difference between the two runs is the architecture. Next-token cross-entropy, plus the
MoE's auxiliary losses; AdamW with linear warm-up and cosine decay; gradient clipping.

Layout of `out_dir`:
    dense/, moe/          model folders (see crossdiff.models.io); config.json written last
    checkpoints/{name}/   checkpoint.safetensors (weights + AdamW state + RNG) and state.json
                          while a model trains; removed once its folder is complete
    tokenizer/            when a tokenizer is given
    eval.json             held-out cross-entropy per model and domain vs the unigram baseline,
                          the MoE's expert load table, and the evaluation history

The loop is here; one step and its schedule are in crossdiff.models.step, checkpoints and the
settings a resume must match in crossdiff.models.checkpoints, the two-process runner in
crossdiff.models.processes. The loop calls `train_step` and `tqdm` through this module's
namespace, so a test can replace them here.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crossdiff.data.tokens import TokenSet
from crossdiff.models.build import build_model
from crossdiff.models.checkpoints import (
    CHECKPOINT_FORMAT,
    finished_history,
    load_checkpoint,
    run_settings,
    save_checkpoint,
)
from crossdiff.models.configs import get_preset, matched_configs
from crossdiff.models.evaluate import evaluate_models, heldout_cross_entropy, print_evaluation
from crossdiff.models.io import config_from_dict, config_to_dict, load_model, save_model
from crossdiff.models.moe import DEFAULT_LOAD_BALANCE_COEF, DEFAULT_Z_LOSS_COEF, moe_modules
from crossdiff.models.processes import train_in_processes
from crossdiff.models.step import (
    TrainOptions,
    batch_rows,
    learning_rate,
    make_optimizer,
    train_step,
)
from crossdiff.plumbing.common import CrossdiffError, read_json, seed_everything, write_json_atomic
from crossdiff.plumbing.distributed import (
    barrier,
    check_same_on_all_ranks,
    compute_device,
    dist_info,
    shard_rows,
)
from crossdiff.plumbing.integrity import check_finite_module

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_NAMES",
    "TrainOptions",
    "TrainedModels",
    "batch_rows",
    "learning_rate",
    "make_optimizer",
    "run_worker",
    "train_language_models",
    "train_step",
]

MODEL_NAMES = ("dense", "moe")


@dataclass
class TrainedModels:
    dense: HookedTransformer
    moe: HookedTransformer
    eval: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def train_language_models(
    train: TokenSet,
    heldout: TokenSet,
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    dense_cfg: HookedTransformerConfig | None = None,
    moe_cfg: HookedTransformerConfig | None = None,
    tokenizer: Any = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    warmup: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    eval_rows: int = 64,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    load_balance_coef: float = DEFAULT_LOAD_BALANCE_COEF,
    z_loss_coef: float = DEFAULT_Z_LOSS_COEF,
    threads: int | None = None,
    parallel: bool | None = None,
    autocast: bool | None = None,
    init_seed: int | None = None,
) -> TrainedModels:
    """Train the dense and the MoE model of `preset` (or the given configs) on `train`, evaluate
    on `heldout`, and write everything under `out_dir` (see the module docstring).

    Re-running resumes: a finished model folder whose config and settings match is loaded, not
    retrained; an interrupted model continues from its last checkpoint.
    `tokenizer` (optional, anything with `.vocab_size` and `.save(dir)`) sets the vocabulary
    size of preset configs and is saved to `out_dir/tokenizer/`.

    On a CPU with two or more cores the two models train at the same time in two processes
    (`parallel`, default on for CPU), each with `threads` torch threads (default: half the
    cores); small matmuls scale poorly across threads, so this is faster than one after the
    other. Both processes read the same rows in the same order either way.

    Under torchrun (`torchrun --nproc_per_node N -m crossdiff train-models ...`) the models train
    one after the other, each data-parallel over the N processes: every step's global batch of
    `batch_size` rows is split into N disjoint parts, one per rank, and DistributedDataParallel
    averages the gradients, so the run follows the single-process one with the same global batch.
    Rank 0 writes checkpoints and model folders; a checkpoint resumes on any number of processes.

    `autocast` (default: on for CUDA) runs the forward under bfloat16 autocast; weights, AdamW
    state, softmaxes and the loss stay float32.

    `init_seed` (default: `seed`) seeds the weights' initialization only; `seed` still orders the
    batches. Two runs that differ only in `init_seed` see the same tokens in the same order, which
    is what a same-architecture control needs (`crossdiff run --controls`).
    """
    out_dir = Path(out_dir)
    info = dist_info()
    device = compute_device(device)
    defaults = get_preset(preset).training
    opts = TrainOptions(
        steps=defaults["steps"] if steps is None else steps,
        batch_size=defaults["batch_size"] if batch_size is None else batch_size,
        lr=defaults["lr"] if lr is None else lr,
        warmup=defaults["warmup"] if warmup is None else warmup,
        seed=seed,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        eval_every=defaults["eval_every"] if eval_every is None else eval_every,
        checkpoint_every=defaults["checkpoint_every"]
        if checkpoint_every is None
        else checkpoint_every,
        eval_rows=eval_rows,
        load_balance_coef=load_balance_coef,
        z_loss_coef=z_loss_coef,
        autocast=device.type == "cuda" if autocast is None else bool(autocast),
        init_seed=init_seed,
    )
    _check_options(opts)
    if opts.batch_size % info.world_size:
        raise CrossdiffError(
            f"batch_size={opts.batch_size} rows does not split evenly over {info.world_size} "
            "processes; use a batch size divisible by the number of processes"
        )
    check_same_on_all_ranks(opts.steps * 1_000_003 + opts.batch_size, "steps and batch size")
    if dense_cfg is None or moe_cfg is None:
        vocab = {} if tokenizer is None else {"d_vocab": int(tokenizer.vocab_size)}
        preset_dense, preset_moe = matched_configs(preset, **vocab)
        dense_cfg = dense_cfg or preset_dense
        moe_cfg = moe_cfg or preset_moe
    cfgs = {"dense": dense_cfg, "moe": moe_cfg}
    for name, cfg in cfgs.items():
        _check_data_fits(train, heldout, cfg, name)
    if tokenizer is not None and info.is_main:
        tokenizer.save(out_dir / "tokenizer")

    if info.is_main:
        ranks = f", {info.world_size} processes" if info.enabled else ""
        print(
            f"training dense and MoE models on {len(train)} rows x {train.seq_len} tokens "
            f"({opts.steps} steps of {opts.batch_size} rows, device {device}{ranks})"
        )
    if info.enabled:
        parallel = False  # the ranks are the parallelism
    models, history = _train_both(cfgs, train, heldout, out_dir, opts, device, threads, parallel)

    # every rank evaluates the same weights on the same rows; rank 0 writes and prints
    results = evaluate_models(models, train, heldout, max_rows=opts.eval_rows)
    results["training"] = opts.as_dict()
    results["history"] = history
    if info.is_main:
        write_json_atomic(out_dir / "eval.json", results)
        print_evaluation(results)
    barrier()
    paths = {name: out_dir / name for name in MODEL_NAMES} | {"eval": out_dir / "eval.json"}
    if tokenizer is not None:
        paths["tokenizer"] = out_dir / "tokenizer"
    if info.is_main:
        print(f"wrote {paths['dense']}, {paths['moe']} and {paths['eval']}")
    return TrainedModels(dense=models["dense"], moe=models["moe"], eval=results, paths=paths)


def _check_options(opts: TrainOptions) -> None:
    for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_rows"):
        if getattr(opts, key) < 1:
            raise CrossdiffError(f"{key} must be at least 1, got {getattr(opts, key)}")
    if opts.warmup < 0 or opts.lr <= 0:
        raise CrossdiffError(f"need lr > 0 and warmup >= 0, got lr={opts.lr}, warmup={opts.warmup}")


def _check_data_fits(
    train: TokenSet, heldout: TokenSet, cfg: HookedTransformerConfig, name: str
) -> None:
    if len(train) == 0:
        raise CrossdiffError("the training token set is empty; prepare data with more text")
    if len(heldout) == 0:
        raise CrossdiffError("the held-out token set is empty; use a larger heldout_fraction")
    for what, ts in (("train", train), ("held-out", heldout)):
        if ts.seq_len > cfg.n_ctx:
            raise CrossdiffError(
                f"{what} rows have {ts.seq_len} tokens but the {name} model's n_ctx is "
                f"{cfg.n_ctx}; use n_ctx >= {ts.seq_len} or shorter rows"
            )
        top = int(ts.tokens.max())
        if top >= cfg.d_vocab:
            raise CrossdiffError(
                f"{what} tokens go up to id {top} but the {name} model's d_vocab is "
                f"{cfg.d_vocab}; pass the tokenizer (or d_vocab >= {top + 1}) to the config"
            )


def _train_both(
    cfgs: dict[str, HookedTransformerConfig],
    train: TokenSet,
    heldout: TokenSet,
    out_dir: Path,
    opts: TrainOptions,
    device: torch.device,
    threads: int | None,
    parallel: bool | None,
) -> tuple[dict[str, HookedTransformer], dict[str, list[dict[str, Any]]]]:
    history = {
        name: finished_history(name, cfg, train, out_dir, opts) for name, cfg in cfgs.items()
    }
    todo = [name for name in cfgs if history[name] is None]
    cores = os.cpu_count() or 1
    if parallel is None:
        parallel = device.type == "cpu" and cores >= 2
    if parallel and len(todo) == 2:
        histories = train_in_processes(
            cfgs, train, heldout, out_dir, opts, device, threads or max(1, cores // 2)
        )
        history.update(histories)
    else:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            for position, name in enumerate(todo):
                history[name] = _train_model(
                    name, cfgs[name], train, heldout, out_dir, opts, device, position
                )
        finally:
            torch.set_num_threads(previous)
    models = {name: load_model(out_dir / name, device=device) for name in cfgs}
    return models, history  # type: ignore[return-value]


def run_worker(spec_path: str) -> None:
    """The body of one training process (see crossdiff/models/worker.py)."""
    spec = read_json(spec_path, what="worker spec")
    torch.set_num_threads(int(spec["threads"]))
    _train_model(
        spec["name"],
        config_from_dict(spec["config"]),
        TokenSet.load(spec["train"]),
        TokenSet.load(spec["heldout"]),
        Path(spec["out_dir"]),
        TrainOptions(**spec["options"]),
        torch.device(spec["device"]),
        int(spec["position"]),
    )


def _train_model(
    name: str,
    cfg: HookedTransformerConfig,
    train: TokenSet,
    heldout: TokenSet,
    out_dir: Path,
    opts: TrainOptions,
    device: torch.device,
    position: int = 0,
) -> list[dict[str, Any]]:
    """Train one model from scratch or from its checkpoint and write its folder (under torchrun:
    data-parallel, rank 0 writing)."""
    info = dist_info()
    model_dir = out_dir / name
    settings = run_settings(cfg, opts, train)
    seed_everything(opts.seed if opts.init_seed is None else opts.init_seed)
    cfg = _on_device(cfg, device)
    model = build_model(cfg, load_balance_coef=opts.load_balance_coef, z_loss_coef=opts.z_loss_coef)
    model.train()
    optimizer = make_optimizer(model, opts)
    ckpt_dir = out_dir / "checkpoints" / name
    start, history, curve = load_checkpoint(ckpt_dir, model, optimizer, settings)
    if start and info.is_main:
        print(f"{name}: resuming from the checkpoint at step {start} in {ckpt_dir}")
    ddp = None
    if info.enabled:
        ddp = _data_parallel(model, device)
        for moe in moe_modules(model):
            moe.global_load_balance = True

    tokens_per_step = opts.batch_size * train.seq_len
    # one bar per model with its rate and ETA, also in a log file (a line every 10 s there);
    # TQDM_DISABLE=1 silences it, other ranks never draw one
    bar = tqdm(
        range(start, opts.steps),
        initial=start,
        total=opts.steps,
        desc=f"train {name}",
        unit="step",
        position=position,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
        **({} if info.is_main else {"disable": True}),
    )
    started = time.perf_counter()
    for done, step in enumerate(bar, start=1):
        rows = shard_rows(batch_rows(step, opts.batch_size, len(train), opts.seed), info)
        tokens = train.tokens[rows].to(device, non_blocking=True)
        lr = learning_rate(step, opts)
        ce, aux = train_step(
            model, optimizer, tokens, lr, opts.grad_clip, ddp=ddp, autocast=opts.autocast
        )
        if not (math.isfinite(ce) and math.isfinite(aux)):
            raise CrossdiffError(
                f"{name}: the loss became non-finite at step {step} (cross-entropy {ce}, aux "
                f"{aux}) on training rows {_clip_rows(rows)}; training diverged: lower the "
                f"learning rate or raise the warm-up, then delete {ckpt_dir} to start over (or "
                "rerun to resume from the last checkpoint)"
            )
        curve.append([round(ce, 6), round(aux, 6)])
        rate = done * tokens_per_step / (time.perf_counter() - started)
        bar.set_postfix(ce=f"{ce:.3f}", aux=f"{aux:.4f}", tok_s=f"{rate:.0f}")
        if (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps:
            per_domain = heldout_cross_entropy(model, heldout, max_rows=8)
            model.train()
            history.append({"step": step + 1, "train_ce": ce, "heldout_ce": per_domain})
            shown = ", ".join(f"{d} {v:.3f}" for d, v in per_domain.items())
            if info.is_main:
                tqdm.write(f"{name} step {step + 1}: train ce {ce:.3f}; held-out ce {shown}")
        if (step + 1) % opts.checkpoint_every == 0 and step + 1 < opts.steps and info.is_main:
            save_checkpoint(ckpt_dir, model, optimizer, step + 1, settings, history, curve)
    bar.close()

    model.eval()
    for moe in moe_modules(model):
        moe.global_load_balance = False
    check_finite_module(
        model, f"the {name} model after training", "lower the learning rate", buffers=False
    )
    if info.is_main:
        training = {"settings": settings, "history": history, "loss_curve": curve}
        save_model(model, model_dir, extra={"training": training})
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        print(f"{name}: wrote {model_dir}")
    barrier()  # the other ranks load the folder rank 0 has just written
    return history


def _clip_rows(rows: Tensor, n: int = 8) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:n])
    return f"[{shown}{', ...' if len(rows) > n else ''}]"


def _data_parallel(model: HookedTransformer, device: torch.device) -> DistributedDataParallel:
    ids = [device.index] if device.type == "cuda" else None
    # buffers (attention masks, rotary tables) are constants: no need to sync them every step
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def _on_device(cfg: HookedTransformerConfig, device: torch.device) -> HookedTransformerConfig:
    return config_from_dict(config_to_dict(cfg), device=str(device))
