"""The device check: a shortened `crossdiff run --preset paper` on this machine's GPU with
nothing downloaded, measured stage by stage, plus crossdiff's MoE layer against TransformerLens's
stock MoE at the paper's shapes. Writes one JSON file (default benchmarks/out/gpu_check.json).

    bash benchmarks/gpu_check.sh                 # paper shapes on the GPU (under 8 min on an H200)
    bash benchmarks/gpu_check.sh --micro         # the micro preset on the CPU (the suite's test)

Paper mode: the paper's model shapes (d_model 768, 5 layers, 8 experts top-2, 1,024-token rows,
batch 64) trained for --lm-steps steps on the embedded corpus with an 8,192-token BPE trained
here (the paper uses GPT-2's 50,257, which would be a download), a bfloat16 store of
--harvest-tokens tokens, and the paper's crosscoder (32x, k 300) for --crosscoder-steps steps.
Per stage: seconds, tokens/s, FLOPs (counted as crossdiff.run.estimate counts them, on the real
configs), MFU against the device's peak (bf16 peak on a GPU, the measured float32 matmul rate on
a CPU), the predicted seconds for the same work, peak GPU memory (CUDA) and the bytes the stage
wrote. Every number in the JSON is finite.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens.components.mlps.moe import MoE

from crossdiff.data.embedded import DEFAULT_CHARS_PER_DOMAIN
from crossdiff.models import CrossdiffMoE, moe_config
from crossdiff.models.grouped_mm import grouped_mm_usable
from crossdiff.models.io import config_from_dict, read_model_header
from crossdiff.run import estimate
from crossdiff.run.pipeline import STAGES, resolve_options, run_pipeline

OUT = Path(__file__).parent / "out" / "gpu_check.json"


def check_options(
    micro: bool,
    lm_steps: int,
    harvest_tokens: int,
    cc_steps: int,
    lm_batch_size: int | None = None,
    report_tokens: int = 100_000,
) -> dict:
    if micro:
        return resolve_options("micro", {"report": {"splice_sequences": 4}})
    options = resolve_options(
        "paper",
        {
            "models": {
                "steps": lm_steps,
                "batch_size": lm_batch_size,
                "eval_every": lm_steps,
                "checkpoint_every": lm_steps,
            },
            "store": {"n_tokens": harvest_tokens},
            "crosscoder": {"steps": cc_steps, "checkpoint_every": cc_steps},
            "report": {"max_tokens": report_tokens, "splice_sequences": 8},
        },
    )
    # embedded corpus, tokenizer trained here: nothing downloaded
    options["data"] = {
        "source": "embedded",
        "preset": "paper",  # 1,024-token rows
        "vocab_size": 8192,
        "n_chars_per_domain": DEFAULT_CHARS_PER_DOMAIN,  # ~2M tokens; the LM steps cycle them
    }
    return options


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_stages(out: Path, preset: str, options: dict, device: str) -> dict[str, dict[str, float]]:
    """The pipeline one stage at a time (each call resumes the previous), timing each."""
    measured = {}
    overrides = {stage: dict(values) for stage, values in options.items()}
    for stage in STAGES:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = run_pipeline(out, preset, overrides=overrides, device=device, stop_after=stage)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = summary.stage_seconds.get(stage, time.perf_counter() - start)
        measured[stage] = {
            "seconds": seconds,
            "peak_gpu_memory_gb": (
                torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else 0.0
            ),
            "disk_gb": _bytes(out / stage) / 1e9,
        }
    return measured


def throughput(out: Path, options: dict, measured: dict, spec: estimate.DeviceSpec) -> None:
    """Adds tokens, tokens/s, FLOPs, MFU and the predicted seconds (crossdiff.run.estimate on the
    trained models' configs) to each measured stage."""
    configs = tuple(
        config_from_dict(read_model_header(out / "models" / name)["config"], device="cpu")
        for name in ("dense", "moe")
    )
    predicted = estimate.estimate_run(options, spec, configs=configs)
    for stage in ("models", "store", "crosscoder", "report"):
        e, m = predicted[stage], measured[stage]
        seconds = max(m["seconds"], 1e-9)
        m["tokens"] = float(e.tokens)
        m["tokens_per_s"] = e.tokens / seconds
        m["flops"] = e.flops
        m["mfu"] = e.flops / seconds / (spec.peak_tflops * 1e12)
        m["predicted_seconds"] = float(e.seconds)


def _median_seconds(step, repeats: int, cuda: bool) -> float:
    times = []
    for i in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up runs
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def moe_layer(micro: bool, device: str, repeats: int) -> dict[str, Any]:
    """crossdiff's MoE vs TransformerLens's stock MoE, same weights and input, forward + backward
    (bfloat16 autocast on CUDA, float32 on the CPU); also their largest relative difference."""
    cfg = moe_config("tiny" if micro else "paper", device=device)
    tokens = (4, 256) if micro else (8, 1024)
    torch.manual_seed(0)
    ours = CrossdiffMoE(cfg).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        stock = MoE(cfg).to(device)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(*tokens, cfg.d_model, device=device)
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32

    def step(layer):
        def run():
            with torch.autocast(x.device.type, dtype=dtype, enabled=cuda):
                out = layer(x.requires_grad_())
            out.float().square().mean().backward()
            return out

        return run

    with torch.autocast(x.device.type, dtype=dtype, enabled=cuda):
        a, b = ours(x).float(), stock(x).float()
    rel = float(((a - b).norm() / b.norm()).detach())
    n_tokens = tokens[0] * tokens[1]
    ours_s = _median_seconds(step(ours), repeats, cuda)
    stock_s = _median_seconds(step(stock), repeats, cuda)
    return {
        "d_model": float(cfg.d_model),
        "expert_width": float(cfg.d_mlp),
        "num_experts": float(cfg.num_experts),
        "top_k": float(cfg.experts_per_token),
        "tokens_per_step": float(n_tokens),
        "crossdiff_tokens_per_s": n_tokens / ours_s,
        "stock_tokens_per_s": n_tokens / stock_s,
        "speedup": stock_s / ours_s,
        "relative_difference": rel,
        "grouped_mm": float(cuda and _grouped_under_autocast(x, cfg.d_model, cfg.d_mlp)),
    }


def _grouped_under_autocast(x: torch.Tensor, d_model: int, d_mlp: int) -> bool:
    """Whether crossdiff's MoE took the grouped-matmul path in the timed steps."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return grouped_mm_usable(x, torch.float32, d_model, d_mlp)


def _check_finite(tree: Any, where: str = "") -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _check_finite(value, f"{where}.{key}")
    elif isinstance(tree, float | int) and not math.isfinite(tree):
        raise SystemExit(f"gpu_check: {where} is {tree}, not a finite number")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro", action="store_true", help="the micro preset on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--lm-steps", type=int, default=200)
    parser.add_argument("--harvest-tokens", type=int, default=1_000_000)
    parser.add_argument("--crosscoder-steps", type=int, default=500)
    parser.add_argument("--lm-batch-size", type=int, default=None, help="default: the paper's 64")
    parser.add_argument("--report-tokens", type=int, default=100_000)
    parser.add_argument("--moe-repeats", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None, help="run folder (default: a temp one)")
    parser.add_argument("--json", type=Path, default=OUT, help="where to write the results")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.micro:
        device = args.device or "cpu"
    spec = estimate.device_spec(device)
    options = check_options(
        args.micro,
        args.lm_steps,
        args.harvest_tokens,
        args.crosscoder_steps,
        args.lm_batch_size,
        args.report_tokens,
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="crossdiff-gpu-check-"))
    started = time.perf_counter()
    try:
        preset = "micro" if args.micro else "paper"
        measured = run_stages(work / "run", preset, options, device)
        throughput(work / "run", options, measured, spec)
        disk_used = _bytes(work / "run") / 1e9
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "device": {
            "name": spec.name,
            "peak_tflops": spec.peak_tflops,
            "hbm_tbs": spec.hbm_tbs,
            "torch": torch.__version__,
        },
        "mode": "micro" if args.micro else "paper-shortened",
        "options": options,
        "stages": measured,
        "disk_used_gb": disk_used,
        "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "moe_layer": moe_layer(args.micro, device, args.moe_repeats),
    }
    result["total_seconds"] = time.perf_counter() - started
    _check_finite({k: v for k, v in result.items() if k != "options"})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\n=== device check on {spec.name} ({result['mode']}) ===")
    for stage, m in measured.items():
        rate = f"{m['tokens_per_s']:12,.0f} tok/s  MFU {m['mfu']:.3f}" if "mfu" in m else ""
        print(
            f"  {stage:<11} {m['seconds']:8.1f} s {rate}  peak GPU memory "
            f"{m['peak_gpu_memory_gb']:.2f} GB  disk {m['disk_gb']:.2f} GB"
        )
    moe = result["moe_layer"]
    print(
        f"  MoE layer: {moe['crossdiff_tokens_per_s']:,.0f} tok/s vs stock "
        f"{moe['stock_tokens_per_s']:,.0f} ({moe['speedup']:.2f}x; grouped_mm "
        f"{bool(moe['grouped_mm'])}; relative difference {moe['relative_difference']:.1e})"
    )
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
