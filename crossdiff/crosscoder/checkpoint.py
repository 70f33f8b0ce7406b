"""Training checkpoints as safetensors + JSON (SAETrainer's own checkpoint pickles; not used).

A checkpoint folder holds `state_<step>.safetensors` (weights, Adam moments, dead-latent counters)
and `state.json` (config, step counters, lr-scheduler state, Adam hyper-parameters, the scaling
factors and the options of the run). `state.json` is written last and names its tensor file, so
the pair on disk is always consistent; both are written atomically.

`state.json` also holds the run's identity (`run_identity`): the full training config, every
training option that changes the result, and the fingerprint of the training data. A checkpoint
is resumed only when all of it matches (a changed k, store or learning rate never resumes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crossdiff.plumbing.common import CrossdiffError, atomic_path, read_json, tensors_nbytes
from crossdiff.plumbing.fingerprint import canonical, changes
from crossdiff.plumbing.integrity import (
    damaged_checkpoint_entry,
    move_aside,
    sha256_of_file,
    verify_checksum,
)

FORMAT = "crossdiff-crosscoder-checkpoint"
_SHAPE_KEYS = ("n_models", "d_model", "d_sae", "n_shared", "shared_decoder")
# config fields that do not change what is trained (where it runs, what it is labelled)
_NOT_IDENTITY = ("device", "metadata")


def run_identity(cfg: Any, options: dict[str, Any], source: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the training config (all fields but the
    device and metadata), the training options and the data's fingerprint."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IDENTITY}
    return canonical({"config": config, "options": options, "source": source})


def write_checkpoint(trainer: Any, directory: Path, extra: dict[str, Any]) -> Path:
    sae, optimizer = trainer.sae, trainer.optimizer
    tensors = {f"model.{k}": v for k, v in sae.state_dict().items()}
    opt_state = optimizer.state_dict()
    for index, param_state in opt_state["state"].items():
        for key, value in param_state.items():
            tensors[f"adam.{index}.{key}"] = torch.as_tensor(value)
    tensors["trainer.act_freq_scores"] = trainer.act_freq_scores
    tensors["trainer.n_forward_passes_since_fired"] = trainer.n_forward_passes_since_fired
    steps_done = trainer.n_training_steps
    name = f"state_{steps_done:09d}.safetensors"
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(directory / name, needed_bytes=tensors_nbytes(tensors)) as tmp:
        save_file(tensors, tmp)
        digest = sha256_of_file(tmp)
    state = {
        "format": FORMAT,
        "version": 1,
        "tensors": name,
        "tensors_sha256": digest,  # checked on resume (absent in checkpoints of older versions)
        "steps_done": steps_done,
        "n_training_samples": trainer.n_training_samples,
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "cfg": sae.cfg.to_dict(),
        "adam_param_groups": opt_state["param_groups"],
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        **extra,
    }
    try:
        text = json.dumps(state, indent=1)
    except TypeError as err:  # a torch/SAELens version whose scheduler state is not plain data
        raise CrossdiffError(f"cannot write the training state as JSON: {err}") from err
    with atomic_path(directory / "state.json") as tmp:
        tmp.write_text(text)
    for old in directory.glob("state_*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / "state.json"


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(state, tensors) of the checkpoint in `directory`, or None if there is none."""
    path = directory / "state.json"
    if not path.exists():
        return None
    state = read_json(path, "crosscoder checkpoint")
    if state.get("format") != FORMAT:
        raise CrossdiffError(f"{path} is not a crossdiff crosscoder checkpoint")
    tensor_path = directory / state["tensors"]
    if not tensor_path.exists():
        raise CrossdiffError(f"{path} names {tensor_path}, which is missing; delete {directory}")
    advice = f"delete {directory} to train from the start (or restore the file from a copy)"
    verify_checksum(
        tensor_path,
        "crosscoder checkpoint",
        advice,
        expected=state.get("tensors_sha256"),
        recorded_in="state.json",
    )
    try:
        tensors = load_file(tensor_path)
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise CrossdiffError(f"cannot read the checkpoint {tensor_path} ({err}); {advice}") from err
    weights = [k for k in tensors if k.startswith(("model.", "trainer."))]
    problem = damaged_checkpoint_entry(tensors, weights, "adam.")
    if problem is not None:  # resuming it would turn the weights into NaN at the first step
        moved = move_aside([path, tensor_path], directory)
        raise CrossdiffError(
            f"the checkpoint {tensor_path} cannot be resumed: it holds a {problem}. It was "
            f"moved aside to {moved}, so running the same command again trains from step 0 "
            f"(or copy an undamaged checkpoint into {directory} to resume from it)"
        )
    return state, tensors


def restore_checkpoint(
    trainer: Any,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    identity: dict[str, Any],
) -> None:
    """Load weights, optimizer, scheduler and counters into a freshly built trainer, after
    checking that the checkpoint is of the same run (`run_identity`)."""
    cfg = trainer.sae.cfg
    saved, current = state["cfg"], cfg.to_dict()
    shape_diff = {k: (saved.get(k), current[k]) for k in _SHAPE_KEYS if saved.get(k) != current[k]}
    if shape_diff:
        raise CrossdiffError(
            f"the checkpoint holds a crosscoder of another shape ({shape_diff}, saved vs asked); "
            "use another checkpoint_dir / --out, or delete the old checkpoint to start over "
            "(train-crosscoder: --overwrite)"
        )
    if "identity" not in state:
        raise CrossdiffError(
            "the checkpoint was written by an older crossdiff that did not record its training "
            "data and full configuration, so it cannot be checked; delete it to start over "
            "(train-crosscoder: --overwrite)"
        )
    diff = changes(state["identity"], identity)
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:8])
        raise CrossdiffError(
            f"the checkpoint is of a run with other options or data ({detail}; saved -> "
            "asked); resume with the same settings, or delete the checkpoint to start over "
            "(train-crosscoder: --overwrite)"
        )
    model_state = {
        k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")
    }
    trainer.sae.load_state_dict(model_state)
    adam_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            adam_state.setdefault(int(index), {})[name] = value
    trainer.optimizer.load_state_dict(
        {"state": adam_state, "param_groups": state["adam_param_groups"]}
    )
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    device = trainer.act_freq_scores.device
    trainer.act_freq_scores = tensors["trainer.act_freq_scores"].to(device)
    trainer.n_forward_passes_since_fired = tensors["trainer.n_forward_passes_since_fired"].to(
        device
    )
    trainer.n_training_steps = state["steps_done"]
    trainer.n_training_samples = state["n_training_samples"]
    trainer.n_frac_active_samples = state["n_frac_active_samples"]
