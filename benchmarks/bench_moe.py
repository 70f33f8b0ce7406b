"""Training-step throughput of crossdiff's MoE vs TransformerLens's stock MoE, side by side.

Same config (the tiny preset's MoE unless overridden), same weights, same inputs; the outputs and
gradients are checked to agree before timing. Measures the MoE layer alone and the whole model
(forward + backward + AdamW step), alternating the two implementations run by run, and prints
tokens/s and the ratio. Writes benchmarks/out/bench_moe.json.

    .venv/bin/python benchmarks/bench_moe.py            # full run
    .venv/bin/python benchmarks/bench_moe.py --quick    # a few repetitions
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from transformer_lens import HookedTransformer
from transformer_lens.components.mlps.moe import MoE

from crossdiff.models import CrossdiffMoE, build_model, moe_config


def stock_model(cfg) -> HookedTransformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(cfg)


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def layer_step(layer, x, optimizer):
    def step():
        out = layer(x)
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def model_step(model, tokens, optimizer):
    def step():
        model(tokens, return_type="loss").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def check_layers_agree(ours: CrossdiffMoE, stock: MoE, x: torch.Tensor) -> float:
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = ours(x1), stock(x2)
    out1.square().mean().backward()
    out2.square().mean().backward()
    diff = float((out1 - out2).abs().max())
    grad_diff = float((x1.grad - x2.grad).abs().max())
    params = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        grad_diff = max(grad_diff, float((p.grad - params[name].grad).abs().max()))
    ours.zero_grad(set_to_none=True)
    stock.zero_grad(set_to_none=True)
    if diff > 1e-5 or grad_diff > 1e-5:
        raise SystemExit(
            f"outputs differ: max |out| diff {diff:.2e}, max |grad| diff {grad_diff:.2e}"
        )
    return max(diff, grad_diff)


def compare(name, ours_step, stock_step, tokens_per_step, repeats, warmup):
    for _ in range(warmup):
        ours_step()
        stock_step()
    ours_t, stock_t = [], []
    for _ in range(repeats):  # alternate, so load from other processes hits both alike
        ours_t += time_steps(ours_step, 1)
        stock_t += time_steps(stock_step, 1)
    ours_s, stock_s = statistics.median(ours_t), statistics.median(stock_t)
    result = {
        "crossdiff_tokens_per_s": tokens_per_step / ours_s,
        "stock_tokens_per_s": tokens_per_step / stock_s,
        "crossdiff_ms_per_step": 1000 * ours_s,
        "stock_ms_per_step": 1000 * stock_s,
        "speedup": stock_s / ours_s,
        "repeats": repeats,
    }
    print(
        f"{name:<12} crossdiff {result['crossdiff_tokens_per_s']:9.0f} tok/s   "
        f"stock {result['stock_tokens_per_s']:9.0f} tok/s   speedup {result['speedup']:.2f}x"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "out" / "bench_moe.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (3, 1) if args.quick else (15, 2)

    cfg = moe_config(args.preset, device="cpu")
    torch.manual_seed(0)
    ours_model = build_model(cfg)
    stock = stock_model(cfg)
    stock.load_state_dict(ours_model.state_dict())
    tokens = torch.randint(0, cfg.d_vocab, (args.batch_size, args.seq_len))
    with torch.no_grad():
        logit_diff = float((ours_model(tokens) - stock(tokens)).abs().max())
    assert logit_diff <= 1e-5, f"logits differ by {logit_diff}"

    ours_layer, stock_layer = ours_model.blocks[0].mlp, stock.blocks[0].mlp
    x = torch.randn(args.batch_size, args.seq_len, cfg.d_model)
    layer_diff = check_layers_agree(ours_layer, stock_layer, x)
    n_tokens = args.batch_size * args.seq_len
    print(
        f"config {args.preset}: d_model {cfg.d_model}, {cfg.num_experts} experts of width "
        f"{cfg.d_mlp}, top-{cfg.experts_per_token}; {n_tokens} tokens per step; "
        f"{torch.get_num_threads()} torch threads; outputs agree (logits {logit_diff:.1e}, "
        f"layer out/grads {layer_diff:.1e})"
    )

    def adam(module):
        return torch.optim.AdamW(module.parameters(), lr=1e-4)

    results = {
        "moe_layer": compare(
            "MoE layer",
            layer_step(ours_layer, x, adam(ours_layer)),
            layer_step(stock_layer, x, adam(stock_layer)),
            n_tokens,
            repeats,
            warmup,
        ),
        "whole_model": compare(
            "whole model",
            model_step(ours_model, tokens, adam(ours_model)),
            model_step(stock, tokens, adam(stock)),
            n_tokens,
            max(2, repeats // 2),
            1,
        ),
    }
    report = {
        "benchmark": "bench_moe",
        "command": "benchmarks/bench_moe.py" + (" --quick" if args.quick else ""),
        "preset": args.preset,
        "tokens_per_step": n_tokens,
        "torch_threads": torch.get_num_threads(),
        "max_abs_logit_diff": logit_diff,
        "max_abs_layer_diff": layer_diff,
        "results": results,
        "note": "the machine may be shared; compare the ratios, measured side by side",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
