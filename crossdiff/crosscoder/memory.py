"""Whether a crosscoder of a given size fits in the memory of the device that will train it:
an estimate by part, the device's free memory, and the sentence that says why not."""

from __future__ import annotations

import torch

from crossdiff.plumbing.common import resolve_dtype

GIB = 2**30


def crosscoder_memory_bytes(
    n_models: int, d_model: int, d_sae: int, batch_size: int, dtype: str | torch.dtype = "float32"
) -> dict[str, int]:
    """An estimate of a crosscoder's training memory, by part (bytes).

    parameters: encoder and decoder [n_models * d_model, d_sae] plus biases, in `dtype`;
    optimizer: their gradients and Adam's two moments (the same size again, three times);
    activations: one batch's inputs, reconstructions and residuals (float32, [batch, n_models,
    d_model] three times) and its dense pre-activations, scores and latents ([batch, d_sae] three
    times)."""
    item = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    n_params = 2 * n_models * d_model * d_sae + d_sae + n_models * d_model
    parameters = n_params * item
    return {
        "parameters": parameters,
        "optimizer": 3 * parameters,
        "activations": 4 * batch_size * (3 * n_models * d_model + 3 * d_sae),
    }


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (None when it cannot be told)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no CUDA context possible: the device check reports it
            return None
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return None
    return None


def check_crosscoder_fits(
    n_models: int,
    d_model: int,
    d_sae: int,
    batch_size: int,
    dtype: str | torch.dtype,
    device: torch.device,
    *,
    world_size: int = 1,
) -> str | None:
    """A sentence saying why the crosscoder cannot fit on `device`, or None if it can (or the
    free memory is unknown). Under torchrun each process holds the model and batch / N rows."""
    parts = crosscoder_memory_bytes(
        n_models, d_model, d_sae, max(1, batch_size // max(1, world_size)), dtype
    )
    need, free = sum(parts.values()), available_memory_bytes(device)
    if free is None or need <= free:
        return None
    detail = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())
    return (
        f"a crosscoder with d_sae={d_sae} on {n_models} x {d_model} activations and a batch of "
        f"{batch_size} needs about {need / GIB:.2f} GiB ({detail}) but only {free / GIB:.2f} GiB "
        f"is free on {device}; lower the expansion / d_sae or the batch size, or use a device "
        "with more memory"
    )
