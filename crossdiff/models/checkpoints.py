"""Resuming a language-model run: the settings a finished model or a checkpoint must match, and
the checkpoint file itself (weights, AdamW state and RNG in one safetensors file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crossdiff.data.tokens import TokenSet
from crossdiff.models.io import (
    CONFIG_FILE,
    check_state_dict_fits,
    config_to_dict,
    read_model_header,
)
from crossdiff.models.step import TrainOptions
from crossdiff.plumbing.common import CrossdiffError, atomic_path, tensors_nbytes, write_json_atomic
from crossdiff.plumbing.integrity import (
    check_finite_module,
    checksum_path,
    damaged_checkpoint_entry,
    move_aside,
    sha256_of_file,
    verify_checksum,
    write_checksum,
)

CHECKPOINT_FORMAT = "crossdiff.lm-checkpoint/1"


def run_settings(cfg: HookedTransformerConfig, opts: TrainOptions, train: TokenSet) -> dict:
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


def finished_history(
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
    if saved is not None and saved.get("settings") == run_settings(cfg, opts, train):
        if not quiet:
            print(f"{name}: {model_dir} is complete with the same settings; skipping training")
        return list(saved.get("history", []))
    raise CrossdiffError(
        f"{model_dir} holds a {name} model trained with other settings (config, data or "
        "training options differ); use another --out folder or delete that one to retrain"
    )


def save_checkpoint(
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


def load_checkpoint(
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
    parameters = [f"model.{k}" for k, _ in model.named_parameters()]  # buffers hold -inf masks
    problem = damaged_checkpoint_entry(tensors, parameters, "optim.")
    if problem is not None:  # resuming it would turn the weights into NaN at the first step
        files = [path, checksum_path(path), ckpt_dir / "state.json"]
        moved = move_aside(files, ckpt_dir)
        raise CrossdiffError(
            f"the checkpoint {path} cannot be resumed: it holds a {problem}. It was moved "
            f"aside to {moved}, so running the same command again trains from step 0"
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
