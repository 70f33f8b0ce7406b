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
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crossdiff.common import (
    CrossdiffError,
    atomic_path,
    read_json,
    seed_everything,
    tensors_nbytes,
    write_json_atomic,
)
from crossdiff.data.tokens import TokenSet
from crossdiff.distributed import (
    all_reduce_sum_,
    barrier,
    check_same_on_all_ranks,
    compute_device,
    dist_info,
    shard_rows,
)
from crossdiff.integrity import (
    check_finite_module,
    check_finite_tensors,
    sha256_of_file,
    verify_checksum,
    write_checksum,
)
from crossdiff.models.build import build_model
from crossdiff.models.configs import get_preset, matched_configs
from crossdiff.models.evaluate import evaluate_models, heldout_cross_entropy, print_evaluation
from crossdiff.models.io import (
    CONFIG_FILE,
    check_state_dict_fits,
    config_from_dict,
    config_to_dict,
    load_model,
    read_model_header,
    save_model,
)
from crossdiff.models.lifetime import PARENT_PID_ENV, parent_death_signal
from crossdiff.models.moe import (
    DEFAULT_LOAD_BALANCE_COEF,
    DEFAULT_Z_LOSS_COEF,
    moe_aux_loss,
    moe_modules,
)

CHECKPOINT_FORMAT = "crossdiff.lm-checkpoint/1"
MODEL_NAMES = ("dense", "moe")


@dataclass
class TrainOptions:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    seed: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    eval_every: int = 200
    checkpoint_every: int = 100
    eval_rows: int = 64  # held-out rows per domain in the final evaluation
    load_balance_coef: float = DEFAULT_LOAD_BALANCE_COEF
    z_loss_coef: float = DEFAULT_Z_LOSS_COEF
    autocast: bool = False  # bfloat16 autocast of the forward (fp32 weights, AdamW and loss)
    # the weights' initialization seed; None: `seed`, which also orders the batches. A control
    # model (crossdiff run --controls) differs from its twin only by this.
    init_seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out = json.loads(json.dumps(self.__dict__))
        if out["init_seed"] is None:  # a model trained before init_seed keeps its settings
            del out["init_seed"]
        return out


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


def batch_rows(step: int, batch_size: int, n_rows: int, seed: int) -> Tensor:
    """Row indices of batch `step`: consecutive slices of one seeded permutation per epoch."""
    start = step * batch_size
    epochs = range(start // n_rows, (start + batch_size - 1) // n_rows + 1)
    perm = torch.cat([_epoch_permutation(n_rows, seed, epoch) for epoch in epochs])
    offset = start - epochs[0] * n_rows
    return perm[offset : offset + batch_size]


def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def learning_rate(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms or biases), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": opts.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95))


def train_step(
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
    tokens: Int[Tensor, "batch pos"],
    lr: float,
    grad_clip: float,
    *,
    ddp: DistributedDataParallel | None = None,
    autocast: bool = False,
) -> tuple[float, float]:
    """One optimizer step; returns (cross-entropy, aux loss), averaged over ranks under DDP.

    `ddp` is the DistributedDataParallel wrapping `model` in a torchrun job: the forward goes
    through it so that backward all-reduces the gradients before they are clipped."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        cross_entropy = (ddp or model)(tokens, return_type="loss").float()
        aux = moe_aux_loss(model).to(cross_entropy.device).float()
    (cross_entropy + aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses = torch.stack([cross_entropy.detach(), aux.detach()]).float()
    if ddp is not None:
        losses = all_reduce_sum_(losses) / dist_info().world_size
    ce, aux_value = losses.tolist()
    return ce, aux_value


def _run_settings(cfg: HookedTransformerConfig, opts: TrainOptions, train: TokenSet) -> dict:
    """What a finished model or a checkpoint must match to be reused."""
    cfg_dict = config_to_dict(cfg)
    cfg_dict.pop("device")
    return {
        "config": cfg_dict,
        # how often to evaluate and save, and the compute precision, do not change what is trained
        "options": opts.as_dict()
        | {"eval_every": None, "checkpoint_every": None, "autocast": None},
        "train_rows": len(train),
        "train_seq_len": train.seq_len,
        "train_fingerprint": _fingerprint(train.tokens),
    }


def _fingerprint(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _finished_history(
    name: str,
    cfg: HookedTransformerConfig,
    train: TokenSet,
    out_dir: Path,
    opts: TrainOptions,
    quiet: bool = False,
) -> list[dict[str, Any]] | None:
    """The training history of a complete model folder with these settings; None if there is
    no complete folder; an error if the folder holds a model trained otherwise."""
    model_dir = out_dir / name
    if not (model_dir / CONFIG_FILE).exists():
        return None
    saved = read_model_header(model_dir).get("training")
    if saved is not None and saved.get("settings") == _run_settings(cfg, opts, train):
        if not quiet:
            print(f"{name}: {model_dir} is complete with the same settings; skipping training")
        return list(saved.get("history", []))
    raise CrossdiffError(
        f"{model_dir} holds a {name} model trained with other settings (config, data or "
        "training options differ); use another --out folder or delete that one to retrain"
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
        name: _finished_history(name, cfg, train, out_dir, opts) for name, cfg in cfgs.items()
    }
    todo = [name for name in cfgs if history[name] is None]
    cores = os.cpu_count() or 1
    if parallel is None:
        parallel = device.type == "cpu" and cores >= 2
    if parallel and len(todo) == 2:
        histories = _train_in_processes(
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


def _train_in_processes(
    cfgs: dict[str, HookedTransformerConfig],
    train: TokenSet,
    heldout: TokenSet,
    out_dir: Path,
    opts: TrainOptions,
    device: torch.device,
    threads: int,
) -> dict[str, list[dict[str, Any]]]:
    """Train each model in its own `python -m crossdiff.models.worker` process with `threads`
    threads. The token sets go through safetensors files and the rest through a JSON spec, so
    nothing is pickled and a user's script needs no `if __name__ == "__main__"` guard."""
    work_dir = out_dir / "checkpoints"
    train_path = train.save(work_dir / "train_tokens.safetensors")
    heldout_path = heldout.save(work_dir / "heldout_tokens.safetensors")
    print(f"training both models at once in two processes, {threads} thread(s) each")
    processes: dict[str, subprocess.Popen] = {}
    error_files = {name: work_dir / f"{name}.error.txt" for name in cfgs}
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
    die_with_parent = parent_death_signal()  # set in the child between fork and exec
    previous_handler = _exit_on_sigterm()
    try:
        for position, (name, cfg) in enumerate(cfgs.items()):
            error_files[name].unlink(missing_ok=True)
            spec = {
                "name": name,
                "config": config_to_dict(cfg),
                "train": str(train_path),
                "heldout": str(heldout_path),
                "out_dir": str(out_dir),
                "options": opts.as_dict(),
                "device": str(device),
                "threads": threads,
                "position": position,
                "error_file": str(error_files[name]),
            }
            spec_path = write_json_atomic(work_dir / f"{name}.worker.json", spec)
            command = [sys.executable, "-m", "crossdiff.models.worker", str(spec_path)]
            processes[name] = subprocess.Popen(command, env=env, preexec_fn=die_with_parent)
        codes = {name: process.wait() for name, process in processes.items()}
    finally:
        for process in processes.values():  # on an error, Ctrl-C or SIGTERM: reap the workers
            if process.poll() is None:
                process.terminate()
                process.wait()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        messages = [
            f"{name} (exit code {code}): "
            + (error_files[name].read_text().strip() if error_files[name].exists() else "")
            for name, code in failed.items()
        ]
        raise CrossdiffError(
            "training failed for " + "; ".join(messages) + " (its output is above; a rerun "
            "resumes from the last checkpoint; --no-parallel trains in this process)"
        )
    for path in (train_path, heldout_path, *work_dir.glob("*.worker.json")):
        path.unlink(missing_ok=True)
    return {
        name: _finished_history(name, cfgs[name], train, out_dir, opts, quiet=True) or []
        for name in cfgs
    }


def _exit_on_sigterm() -> Any:
    """Make SIGTERM raise SystemExit, so the `finally` that reaps the workers runs; return the
    previous handler (None when not in the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


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
    settings = _run_settings(cfg, opts, train)
    seed_everything(opts.seed if opts.init_seed is None else opts.init_seed)
    cfg = _on_device(cfg, device)
    model = build_model(cfg, load_balance_coef=opts.load_balance_coef, z_loss_coef=opts.z_loss_coef)
    model.train()
    optimizer = make_optimizer(model, opts)
    ckpt_dir = out_dir / "checkpoints" / name
    start, history, curve = _load_checkpoint(ckpt_dir, model, optimizer, settings)
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
            _save_checkpoint(ckpt_dir, model, optimizer, step + 1, settings, history, curve)
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


def _save_checkpoint(
    ckpt_dir: Path,
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
    step: int,
    settings: dict,
    history: list,
    curve: list,
) -> None:
    """One safetensors file holds weights, AdamW moments and the RNG state; its metadata holds
    the step and settings as JSON, so the file alone is a consistent checkpoint. state.json is
    a readable copy of that metadata."""
    check_finite_module(
        model, f"the model at step {step}", "lower the learning rate", buffers=False
    )
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_state["param_groups"]]
    state_json = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "settings": settings,
        "history": history,
        "loss_curve": curve,
        "param_groups": groups,
    }
    path = ckpt_dir / "checkpoint.safetensors"
    with atomic_path(path, needed_bytes=tensors_nbytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(state_json)})
        digest = sha256_of_file(tmp)
    write_checksum(path, digest)
    write_json_atomic(ckpt_dir / "state.json", state_json)


def _load_checkpoint(
    ckpt_dir: Path, model: HookedTransformer, optimizer: torch.optim.Optimizer, settings: dict
) -> tuple[int, list[dict[str, Any]], list[list[float]]]:
    path = ckpt_dir / "checkpoint.safetensors"
    if not path.exists():
        return 0, [], []
    advice = f"delete {ckpt_dir} to start over (or restore the file from a copy)"
    verify_checksum(path, "language-model checkpoint", advice)
    try:
        with safe_open(str(path), framework="pt") as f:
            state_json = json.loads((f.metadata() or {})["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise CrossdiffError(
            f"cannot read the checkpoint {path} ({err}); delete {ckpt_dir} to start over"
        ) from err
    if state_json.get("format") != CHECKPOINT_FORMAT or state_json.get("settings") != settings:
        raise CrossdiffError(
            f"the checkpoint in {ckpt_dir} comes from another config, data set or training "
            f"options than this run; delete {ckpt_dir} to start over, or rerun with the "
            "settings it was made with"
        )
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    check_state_dict_fits(model, weights, source=str(path))
    parameters = dict(model.named_parameters())
    check_finite_tensors(
        {k: v for k, v in weights.items() if k in parameters}, f"the checkpoint {path}", advice
    )
    model.load_state_dict(weights)
    optim_state: dict[str, Any] = {"state": {}, "param_groups": []}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state["state"].setdefault(int(index), {})[name] = value
    fresh_groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(fresh_groups, state_json["param_groups"], strict=True):
        optim_state["param_groups"].append(saved | {"params": group["params"]})
    optimizer.load_state_dict(optim_state)
    torch.set_rng_state(tensors["rng.torch"])
    history = list(state_json.get("history", []))
    return int(state_json["step"]), history, list(state_json.get("loss_curve", []))
