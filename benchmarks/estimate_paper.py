"""Expected time and memory of each stage of `--preset paper` on one GPU, from counted FLOPs and
bytes (not measured). Prints a markdown table (the one in docs/distributed.md) and writes
benchmarks/out/estimate_paper.json.

    .venv/bin/python benchmarks/estimate_paper.py                        # H100 SXM figures
    .venv/bin/python benchmarks/estimate_paper.py --tflops 989 --mfu 0.4 --hbm-tbs 3.35

Counting rules:
- language-model training: 6 FLOPs per active matmul parameter per token (embedding lookups
  excluded, unembedding included) plus 12 * n_layers * n_ctx * d_model for attention scores;
  memory = 16 bytes per parameter (fp32 weight, grad, two AdamW moments) plus activations by
  Korthikanti et al. (2022), s*b*h*(34 + 5*a*s/h) bytes per layer, in bf16, plus the logits
  (bf16 + fp32 log-softmax);
- harvest: 2 FLOPs per matmul parameter per token through the paired block, both models; the
  store is n_tokens * 2 models * d_model * 2 bytes (bfloat16), written once and read back once
  to checksum it (disk-bound at --disk-gbs);
- crosscoder: the dense encoder (2 * d_in * d_sae FLOPs per token, forward only: the backward is
  sparse), the sparse decode and its backward (8 * k * d_in), the auxiliary loss (6 * k_aux *
  d_in); per step the AdamW update reads and writes every parameter, its gradient and moments
  (HBM-bound) and the step costs --step-overhead-ms of host time (Python and kernel launches);
  memory = 16 bytes per parameter plus the [batch, d_sae] pre-activations.
Time = max(FLOPs / (peak * mfu), bytes / bandwidth) per stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crossdiff.models import matched_configs
from crossdiff.models.configs import count_parameters, get_preset
from crossdiff.pipeline import RUN_PRESETS

OUT = Path(__file__).parent / "out" / "estimate_paper.json"
GB = 1e9


def lm_training(cfg, counts, steps: int, batch: int, args) -> dict:
    tokens = steps * batch * cfg.n_ctx
    matmul_params = counts["active"] - counts["embedding"]
    attention = 12 * cfg.n_layers * cfg.n_ctx * cfg.d_model
    flops = (6 * matmul_params + attention) * tokens
    s, b, h, a = cfg.n_ctx, batch, cfg.d_model, cfg.n_heads
    activations = cfg.n_layers * s * b * h * (34 + 5 * a * s / h)
    logits = s * b * cfg.d_vocab * (2 + 4)
    memory = 16 * counts["total"] + activations + logits
    seconds = flops / (args.tflops * 1e12 * args.mfu)
    return {"tokens": tokens, "flops": flops, "memory_gb": memory / GB, "seconds": seconds}


def harvest(cfgs, n_tokens: int, layer: int, args) -> dict:
    flops = 0
    for cfg in cfgs:
        counts = count_parameters(cfg)
        per_block = (counts["non_embedding_active"]) / cfg.n_layers
        blocks = layer + 1
        flops += (2 * per_block * blocks + 4 * blocks * cfg.n_ctx * cfg.d_model) * n_tokens
    store_bytes = n_tokens * len(cfgs) * cfgs[0].d_model * 2
    compute = flops / (args.tflops * 1e12 * args.mfu)
    disk = 2 * store_bytes / (args.disk_gbs * GB)
    return {
        "tokens": n_tokens,
        "flops": flops,
        "store_gb": store_bytes / GB,
        "memory_gb": sum(16 * count_parameters(c)["total"] for c in cfgs) / 4 / GB,
        "seconds": max(compute, disk),
        "bound": "disk" if disk > compute else "compute",
    }


def crosscoder(d_model: int, options: dict, args) -> dict:
    n_models, d_in = 2, 2 * d_model
    d_sae = int(options["expansion"] * d_model)
    k, batch, steps = options["k"], options.get("batch_size", 1024), options["steps"]
    k_aux = d_in // 2
    per_token = 2 * d_in * d_sae + 8 * k * d_in + 6 * k_aux * d_in
    tokens = steps * batch
    flops = per_token * tokens
    params = 2 * d_in * d_sae + d_sae + n_models * d_model
    step_bytes = params * 4 * 2 * 4  # weight, grad, 2 moments; read and write
    compute = flops / (args.tflops * 1e12 * args.mfu)
    memory_bound = steps * (step_bytes / (args.hbm_tbs * 1e12) + args.step_overhead_ms / 1e3)
    memory = 16 * params + batch * d_sae * 4 * 3
    return {
        "tokens": tokens,
        "d_sae": d_sae,
        "flops": flops,
        "memory_gb": memory / GB,
        "seconds": max(compute, memory_bound),
        "bound": "HBM + launch overhead" if memory_bound > compute else "compute",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, default=989.0, help="dense bf16 peak, TFLOP/s")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of peak achieved")
    parser.add_argument("--hbm-tbs", type=float, default=3.35, help="GPU memory bandwidth, TB/s")
    parser.add_argument("--disk-gbs", type=float, default=2.0, help="disk bandwidth, GB/s")
    parser.add_argument(
        "--step-overhead-ms",
        type=float,
        default=2.0,
        help="host time per crosscoder step (Python, ~100 kernel launches), ms",
    )
    args = parser.parse_args()

    preset = get_preset("paper")
    dense, moe = matched_configs("paper")
    run = RUN_PRESETS["paper"]
    steps, batch = preset.training["steps"], preset.training["batch_size"]
    stages = {
        "train dense LM": lm_training(dense, count_parameters(dense), steps, batch, args),
        "train MoE LM": lm_training(moe, count_parameters(moe), steps, batch, args),
        "harvest (blocks.2, both models)": harvest([dense, moe], run["store"]["n_tokens"], 2, args),
        "train crosscoder": crosscoder(dense.d_model, run["crosscoder"], args),
    }
    print(
        f"assumed: {args.tflops:.0f} TFLOP/s bf16 peak at {args.mfu:.0%} utilisation, "
        f"{args.hbm_tbs} TB/s HBM, {args.disk_gbs} GB/s disk, "
        f"{args.step_overhead_ms} ms host time per crosscoder step\n"
    )
    print("| stage | tokens | FLOPs | GPU memory | expected time | bound by |")
    print("|---|---|---|---|---|---|")
    for name, e in stages.items():
        extra = f" (store {e['store_gb']:.0f} GB on disk)" if "store_gb" in e else ""
        print(
            f"| {name} | {e['tokens']:.3g} | {e['flops']:.3g} | {e['memory_gb']:.1f} GB{extra} | "
            f"{e['seconds'] / 60:.1f} min | {e.get('bound', 'compute')} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"assumptions": vars(args), "stages": stages}, indent=2))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
