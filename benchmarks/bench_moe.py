"""Training-step throughput of crossdiff's MoE vs TransformerLens's stock MoE, side by side.

Same config (the tiny preset's MoE unless overridden), same weights, same inputs; the outputs and
gradients are checked to agree before timing. Measures the MoE layer alone and the whole model
(forward + backward + AdamW step), alternating the implementations run by run, and prints tokens/s
and the ratio, for the whole step and for forward + backward alone (the AdamW step costs both
sides the same). For the layer it also times a floor: only the experts' matmuls (3 forward, 4
backward per expert, on equal blocks of the same slots) plus the same AdamW, with no routing,
activation or gathers -- no implementation of this step can beat that ratio. Writes
benchmarks/out/bench_moe.json.

    .venv/bin/python benchmarks/bench_moe.py            # full run
    .venv/bin/python benchmarks/bench_moe.py --quick    # a few repetitions
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.components.mlps.moe import MoE

from crossdiff.models import CrossdiffMoE, build_model, moe_config


def stock_model(cfg) -> HookedTransformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(cfg)


def layer_step(layer, x, optimizer):
    def step():
        start = time.perf_counter()
        layer(x).square().mean().backward()
        mid = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return mid - start, time.perf_counter() - start

    return step


def model_step(model, tokens, optimizer):
    def step():
        start = time.perf_counter()
        model(tokens, return_type="loss").backward()
        mid = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return mid - start, time.perf_counter() - start

    return step


class _ExpertMatmuls(torch.autograd.Function):
    """Only the matmuls of top-k gated experts, on equal blocks of slots: the arithmetic floor."""

    @staticmethod
    def forward(ctx, slots, *weights):
        outs, ups = [], []
        for i, x_e in enumerate(slots.chunk(len(weights) // 3)):
            w_gate, w_in, w_out = weights[3 * i : 3 * i + 3]
            x_e @ w_gate.t()  # computed and dropped, as a real layer computes it
            ups.append(x_e @ w_in.t())
            outs.append(ups[-1] @ w_out.t())
        ctx.save_for_backward(slots, *weights, *ups)
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad):
        slots, *rest = ctx.saved_tensors
        n = len(rest) // 4
        weights, ups = rest[: 3 * n], rest[3 * n :]
        grads = []
        for i, (x_e, g) in enumerate(zip(slots.chunk(n), grad.chunk(n), strict=True)):
            grad_up = g @ weights[3 * i + 2]
            grads += [grad_up.t() @ x_e, grad_up.t() @ x_e, g.t() @ ups[i]]
        return None, *grads


class MatmulFloor(nn.Module):
    """The stock layer's parameters, but a forward that only runs the experts' matmuls."""

    def __init__(self, stock: MoE):
        super().__init__()
        self.experts, self.W_gate = copy.deepcopy(stock.experts), copy.deepcopy(stock.W_gate)
        self.top_k = stock.experts_per_token

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights = [w.weight for e in self.experts for w in (e.W_gate, e.W_in, e.W_out)]
        out = _ExpertMatmuls.apply(flat.repeat(self.top_k, 1), *weights)
        out = out.view(self.top_k, *x.shape).sum(0)
        # a (zero) gradient for the router too, so AdamW updates the same 25 tensors as the others
        return out + 0 * self.W_gate(x).sum()


def check_layers_agree(ours: CrossdiffMoE, stock: MoE, x: torch.Tensor) -> float:
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = ours(x1), stock(x2)
    out1.square().mean().backward()
    out2.square().mean().backward()
    diff = float((out1 - out2).detach().abs().max())
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


def compare(name, steps, tokens_per_step, repeats, warmup):
    """steps: {"crossdiff": step, "stock": step, ...}, run in turn `repeats` times (so load from
    other processes hits all alike); medians against the stock step."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            times[key].append(step())
    median = {
        key: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for key, ts in times.items()
    }
    stock_fb, stock_s = median["stock"]
    result = {"repeats": repeats}
    for key, (fwd_bwd_s, step_s) in median.items():
        result[key] = {
            "tokens_per_s": tokens_per_step / step_s,
            "ms_per_step": 1000 * step_s,
            "ms_forward_backward": 1000 * fwd_bwd_s,
            "speedup": stock_s / step_s,
            "speedup_forward_backward": stock_fb / fwd_bwd_s,
        }
        r = result[key]
        print(
            f"{name:<12} {key:<13} {r['tokens_per_s']:7.0f} tok/s  {r['ms_per_step']:6.2f} ms/step"
            f"  speedup {r['speedup']:.2f}x  (fwd+bwd alone: {r['ms_forward_backward']:6.2f} ms,"
            f" {r['speedup_forward_backward']:.2f}x)"
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

    floor = MatmulFloor(stock_layer)
    results = {
        "moe_layer": compare(
            "MoE layer",
            {
                "crossdiff": layer_step(ours_layer, x, adam(ours_layer)),
                "stock": layer_step(stock_layer, x, adam(stock_layer)),
                "matmul floor": layer_step(floor, x, adam(floor)),
            },
            n_tokens,
            repeats,
            warmup,
        ),
        "whole_model": compare(
            "whole model",
            {
                "crossdiff": model_step(ours_model, tokens, adam(ours_model)),
                "stock": model_step(stock, tokens, adam(stock)),
            },
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
        "note": "the machine may be shared; compare the ratios, measured side by side. "
        "'matmul floor' runs only the experts' matmuls plus AdamW: the best any layer can do",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
