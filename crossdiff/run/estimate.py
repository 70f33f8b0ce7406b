"""Predicted time, GPU memory and disk of each stage of `crossdiff run`, from counted FLOPs and
bytes (not measured), and the check that the run's files fit on the disk.

Counting rules (per stage):
- models: 6 FLOPs per active matmul parameter per token (embedding lookups excluded, the
  unembedding included) plus 12 * n_layers * n_ctx * d_model for attention scores; memory = 16
  bytes per parameter (float32 weight, gradient, two AdamW moments) plus the activations by
  Korthikanti et al. (2022), s*b*h*(34 + 5*a*s/h) bytes per layer in bf16, plus the logits
  (bf16 + float32 log-softmax); disk = each model's weights and one checkpoint with AdamW state.
- store (harvest): 2 FLOPs per matmul parameter per token through the blocks up to the paired
  one, both models; the store is `store_bytes(options)`, written once and read back once to
  checksum it (disk-bound at the device's disk bandwidth).
- crosscoder: the dense encoder (2 * d_in * d_sae FLOPs per token, forward only: the backward is
  sparse), the sparse decode and its backward (8 * k * d_in), the auxiliary loss (6 * k_aux *
  d_in); per step AdamW reads and writes every parameter, gradient and moment (HBM-bound) and
  the step costs `step_overhead_ms` of host time; disk = weights plus a checkpoint with Adam.
- report: three encoder passes over `max_tokens` tokens; a few MB of files.
- data: the token sets (4 bytes a token) and the corpus text; its time is not predicted (it is
  download-bound for `source="hf"`, seconds for the embedded corpus).
Time = max(FLOPs / (peak * mfu), bytes / bandwidth) per stage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from crossdiff.plumbing.common import CrossdiffError

GB = 1e9
GIB = 2**30
# dense bf16 peak TFLOP/s and HBM TB/s of the GPUs crossdiff knows (SXM parts, no sparsity)
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 4.8),
    "H100": (989.0, 3.35),
    "A100": (312.0, 2.0),
}
UNKNOWN_GPU = (100.0, 1.0)  # conservative figures for a GPU not in the table
DISK_MARGIN_FRACTION = 0.1  # keep this share of the predicted bytes free on top...
DISK_MARGIN_BYTES = 2 * GIB  # ...and this much


@dataclass(frozen=True)
class DeviceSpec:
    """What a device is assumed to do: bf16 (GPU) or float32 (CPU) peak and the share reached."""

    name: str
    kind: str  # "cuda" or "cpu"
    peak_tflops: float
    mfu: float
    hbm_tbs: float
    disk_gbs: float = 2.0
    step_overhead_ms: float = 2.0


def gpu_spec(name: str, mfu: float = 0.4) -> DeviceSpec:
    """The spec of a GPU by its name as CUDA reports it (e.g. "NVIDIA H200")."""
    for key, (tflops, hbm) in GPU_PEAKS.items():
        if key in name.upper():
            return DeviceSpec(name, "cuda", tflops, mfu, hbm)
    tflops, hbm = UNKNOWN_GPU
    return DeviceSpec(name, "cuda", tflops, mfu, hbm)


def measure_cpu_tflops(size: int = 384, repeats: int = 4, trials: int = 3) -> float:
    """float32 matmul throughput of this process's CPU threads, TFLOP/s: the best of `trials`
    short probes (~50 ms in all), so a core busy with another process counts less."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / max(best, 1e-9) / 1e12


def device_spec(
    device: str | torch.device = "cpu", *, cpu_tflops: float | None = None
) -> DeviceSpec:
    """The spec of `device`: a CUDA device by its name (GPU_PEAKS), the CPU by a short matmul
    probe (or `cpu_tflops` if given). A CPU reaches about half its matmul rate in training."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_spec(torch.cuda.get_device_name(device))
    tflops = measure_cpu_tflops() if cpu_tflops is None else cpu_tflops
    return DeviceSpec(f"cpu ({os.cpu_count()} cores)", "cpu", tflops, 0.5, 0.02, 0.5, 1.0)


@dataclass(frozen=True)
class StageEstimate:
    seconds: float | None  # None: not predicted (see the module docstring)
    disk_bytes: int
    memory_bytes: int
    flops: float
    tokens: int
    bound: str


def _model_configs(options: dict[str, dict[str, Any]]) -> tuple[Any, Any, Any]:
    from crossdiff.models.configs import get_preset, matched_configs

    preset = options["models"].get("preset", "tiny")
    dense, moe = matched_configs(preset)
    return get_preset(preset), dense, moe


def _store_width(options: dict[str, dict[str, Any]], d_model: int) -> int:
    from crossdiff.activations.pairing import load_pairing

    pairing = load_pairing(options["store"].get("pairing", "paper"))
    return len(pairing.sites) * d_model  # resid / mlp_out hooks: d_model each


def store_bytes(options: dict[str, dict[str, Any]]) -> int:
    """Bytes of the activation store `options` (resolve_options's) describe: n_tokens x 2
    models x the store width in the store dtype, plus ~24 bytes of per-token metadata (token,
    document, position, domain, experts). 0 when the run reads live activations."""
    store = options["store"]
    if store.get("activations") == "live":
        return 0
    from crossdiff.plumbing.common import resolve_dtype

    _, dense, _ = _model_configs(options)
    item = torch.empty((), dtype=resolve_dtype(store.get("dtype", "float16"))).element_size()
    per_token = 2 * _store_width(options, dense.d_model) * item + 24
    return int(store["n_tokens"]) * per_token


def _data_seq_len(options: dict[str, dict[str, Any]]) -> int:
    from crossdiff.data.prepare import DATA_PRESETS

    data = options["data"]
    base = DATA_PRESETS.get(data.get("preset", "tiny"), DATA_PRESETS["tiny"])
    return int(data.get("seq_len") or base["seq_len"])


def _lm_stage(
    preset: Any, cfgs: tuple[Any, ...], options: dict[str, Any], dev: DeviceSpec, seq_len: int
):
    from crossdiff.models.configs import count_parameters

    steps = int(options.get("steps", preset.training["steps"]))
    batch = int(options.get("batch_size", preset.training["batch_size"]))
    flops = memory = disk = tokens = 0
    for cfg in cfgs:
        counts = count_parameters(cfg)
        s = min(seq_len, cfg.n_ctx)  # the token rows' length
        n_tokens = steps * batch * s
        attention = 12 * cfg.n_layers * s * cfg.d_model
        flops += (6 * (counts["active"] - counts["embedding"]) + attention) * n_tokens
        b, h, a = batch, cfg.d_model, cfg.n_heads
        activations = cfg.n_layers * s * b * h * (34 + 5 * a * s / h)
        memory = max(memory, 16 * counts["total"] + activations + s * b * cfg.d_vocab * 6)
        disk += 4 * counts["total"] + 16 * counts["total"]  # weights + a checkpoint with AdamW
        tokens += n_tokens
    seconds = flops / (dev.peak_tflops * 1e12 * dev.mfu)
    return StageEstimate(seconds, int(disk), int(memory), float(flops), tokens, "compute")


def _store_stage(options: dict[str, dict[str, Any]], cfgs: tuple[Any, ...], dev: DeviceSpec):
    from crossdiff.activations.pairing import hook_layer, load_pairing
    from crossdiff.models.configs import count_parameters

    n_tokens = int(options["store"]["n_tokens"])
    pairing = load_pairing(options["store"].get("pairing", "paper"))
    layers = [hook_layer(h) for h in pairing.hooks_a + pairing.hooks_b]
    blocks = max([layer for layer in layers if layer is not None], default=cfgs[0].n_layers - 1) + 1
    flops = 0
    for cfg in cfgs:
        per_block = count_parameters(cfg)["non_embedding_active"] / cfg.n_layers
        flops += (2 * per_block * blocks + 4 * blocks * cfg.n_ctx * cfg.d_model) * n_tokens
    size = store_bytes(options)
    compute = flops / (dev.peak_tflops * 1e12 * dev.mfu)
    disk = 2 * size / (dev.disk_gbs * GB)
    memory = sum(4 * count_parameters(c)["total"] for c in cfgs)
    bound = "disk" if disk > compute else "compute"
    return StageEstimate(max(compute, disk), size, memory, float(flops), n_tokens, bound)


def _crosscoder_stage(cc: dict[str, Any], d_store: int, dev: DeviceSpec) -> StageEstimate:
    n_models, d_in = 2, 2 * d_store
    d_sae = int(cc.get("expansion", 8) * d_store)
    k, batch, steps = int(cc.get("k", 32)), int(cc.get("batch_size", 1024)), int(cc["steps"])
    k_aux = d_in // 2
    tokens = steps * batch
    flops = (2 * d_in * d_sae + 8 * k * d_in + 6 * k_aux * d_in) * tokens
    params = 2 * d_in * d_sae + d_sae + n_models * d_store
    step_bytes = params * 4 * 2 * 4  # weight, grad, 2 moments; read and write
    compute = flops / (dev.peak_tflops * 1e12 * dev.mfu)
    memory_bound = steps * (step_bytes / (dev.hbm_tbs * 1e12) + dev.step_overhead_ms / 1e3)
    bound = "HBM + launch overhead" if memory_bound > compute else "compute"
    memory = 16 * params + batch * d_sae * 4 * 3
    return StageEstimate(
        max(compute, memory_bound), 4 * params + 16 * params, memory, float(flops), tokens, bound
    )


def _report_stage(options: dict[str, dict[str, Any]], d_store: int, dev: DeviceSpec):
    tokens = int(options["report"].get("max_tokens", 200_000))
    d_sae = int(options["crosscoder"].get("expansion", 8) * d_store)
    flops = 3 * 2 * (2 * d_store) * d_sae * tokens
    seconds = flops / (dev.peak_tflops * 1e12 * dev.mfu)
    memory = 4096 * d_sae * 4 * 3  # streamed in batches of ~4k tokens: pre-acts, codes, scores
    return StageEstimate(seconds, 50_000_000, memory, float(flops), tokens, "compute")


def _data_stage(options: dict[str, dict[str, Any]]) -> StageEstimate:
    from crossdiff.data.embedded import DEFAULT_CHARS_PER_DOMAIN
    from crossdiff.data.prepare import DATA_PRESETS

    data = options["data"]
    base = DATA_PRESETS.get(data.get("preset", "tiny"), DATA_PRESETS["tiny"])
    chars = 3 * int(data.get("n_chars_per_domain") or base["n_chars_per_domain"] or 0)
    chars = chars or 3 * DEFAULT_CHARS_PER_DOMAIN
    tokens = chars // 4  # ~4 characters a token for BPE on English and code
    seconds = None if data.get("source", base["source"]) == "hf" else 0.0
    return StageEstimate(seconds, chars + 4 * tokens, 0, 0.0, tokens, "download / tokenizer")


def estimate_run(
    options: dict[str, dict[str, Any]],
    device: str | torch.device | DeviceSpec = "cpu",
    configs: tuple[Any, Any] | None = None,
) -> dict[str, StageEstimate]:
    """Predicted time, GPU (or host) memory and disk of each stage of a run with `options`
    (pipeline.resolve_options) on `device`, in pipeline order. `configs`: the (dense, MoE)
    HookedTransformerConfigs if known (trained models), else the models preset's."""
    dev = device if isinstance(device, DeviceSpec) else device_spec(device)
    preset, dense, moe = _model_configs(options)
    if configs is not None:
        dense, moe = configs
    d_store = _store_width(options, dense.d_model)
    seq_len = _data_seq_len(options)
    models = _lm_stage(preset, (dense, moe), options["models"], dev, seq_len)
    store = _store_stage(options, (dense, moe), dev)
    crosscoder = _crosscoder_stage(options["crosscoder"], d_store, dev)
    out = {"data": _data_stage(options), "models": models, "store": store, "crosscoder": crosscoder}
    n_seeds = int(options.get("replicates", {}).get("crosscoder_seeds", 1))
    if n_seeds > 1:
        out["cc seeds"] = _times(crosscoder, n_seeds - 1)
    n_models = int(options.get("model_seeds", {}).get("n", 1))
    if n_models > 1:
        # each extra model seed is the main pair again, with its own store; the joint crosscoder
        # reads all 2N models, so its step costs about N pair crosscoders' (one per seed)
        out |= {
            "seed models": _times(models, n_models - 1),
            "seed stores": _times(store, n_models - 1),
            "joint ccs": _times(crosscoder, n_models * n_seeds),
        }
    out["report"] = _report_stage(options, d_store, dev)
    if n_seeds > 1 or n_models > 1:
        n_diffs = n_seeds * (1 + (n_models > 1))
        out["report"] = replace(_times(out["report"], n_diffs), disk_bytes=out["report"].disk_bytes)
    return out


def _times(stage: StageEstimate, n: int) -> StageEstimate:
    """`stage` done n times over (time, disk, FLOPs and tokens; memory is that of one)."""
    return replace(
        stage,
        seconds=None if stage.seconds is None else stage.seconds * n,
        disk_bytes=stage.disk_bytes * n,
        flops=stage.flops * n,
        tokens=stage.tokens * n,
    )


def _human_time(seconds: float | None) -> str:
    if seconds is None:
        return "not predicted"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def estimate_lines(estimates: dict[str, StageEstimate], dev: DeviceSpec) -> list[str]:
    """The table `crossdiff run` prints before its first stage."""
    lines = [
        f"predicted on {dev.name} ({dev.peak_tflops:.3g} TFLOP/s peak at {dev.mfu:.0%}; counted "
        "FLOPs and bytes, not measured):"
    ]
    for name, e in estimates.items():
        lines.append(
            f"  {name:<11} {_human_time(e.seconds):>14}  disk {e.disk_bytes / GB:8.2f} GB  "
            f"memory {e.memory_bytes / GB:6.2f} GB  ({e.bound})"
        )
    total = sum(e.seconds or 0.0 for e in estimates.values())
    disk = sum(e.disk_bytes for e in estimates.values())
    lines.append(f"  {'total':<11} {_human_time(total):>14}  disk {disk / GB:8.2f} GB")
    return lines


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while we walk
                total += os.stat(os.path.join(root, name)).st_size
    return total


def check_disk(out_dir: str | Path, estimates: dict[str, StageEstimate]) -> int:
    """Refuse (CrossdiffError) a run whose predicted files do not fit on `out_dir`'s disk with
    a margin; the files a previous run already wrote there count as written. Returns the bytes
    still to be written."""
    out = Path(out_dir)
    predicted = sum(e.disk_bytes for e in estimates.values())
    needed = max(0, predicted - (_bytes_under(out) if out.exists() else 0))
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    wanted = int(needed * (1 + DISK_MARGIN_FRACTION)) + DISK_MARGIN_BYTES
    if wanted > free:
        store = estimates["store"].disk_bytes if "store" in estimates else 0
        raise CrossdiffError(
            f"the run needs about {needed / GB:.1f} GB more disk in {out} (store "
            f"{store / GB:.1f} GB; {wanted / GB:.1f} GB with the margin) but the disk has "
            f"{free / GB:.1f} GB free. Harvest fewer tokens (--harvest-tokens), run with "
            "--activations live (the crosscoder reads the models' activations as they are "
            "computed, no store on disk), or give --out a folder on a bigger disk"
        )
    return needed


def as_json(estimates: dict[str, StageEstimate], dev: DeviceSpec) -> dict[str, Any]:
    return {"device": asdict(dev), "stages": {k: asdict(v) for k, v in estimates.items()}}
