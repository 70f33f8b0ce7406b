"""crossdiff's crosscoder vs SAELens's own BatchTopK SAE on the concatenated activations.

One run, same activations, same d_sae, k, batch, steps, learning-rate schedule and decoder-bias
initialisation; both trained by SAELens's SAETrainer. Reports training throughput (tokens/s) and
FVE at equal L0 (BatchTopK on each evaluation batch, so L0 = k for both), and writes
benchmarks/out/bench_crosscoder.json.

    .venv/bin/python benchmarks/bench_crosscoder.py            # full
    .venv/bin/python benchmarks/bench_crosscoder.py --quick    # small, about a minute
    .venv/bin/python benchmarks/bench_crosscoder.py --store runs/x/store   # on harvested acts
    .venv/bin/python benchmarks/bench_crosscoder.py --sweep --points small  # the shape grid

--sweep runs a grid of shapes (benchmarks/crosscoder_sweep.py): throughput only, each point
crossdiff vs SAELens interleaved, median of --repeats, with a per-phase split of the step and the
fraction of the step's matmul FLOP floor; writes benchmarks/out/bench_crosscoder_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from crossdiff.crosscoder import CrossCoderConfig, default_lr, evaluate_crosscoder, train_crosscoder
from crossdiff.crosscoder.metrics import ReconstructionMeter
from crossdiff.crosscoder.synthetic import planted_crosscoder_data


def normalized(acts: torch.Tensor) -> torch.Tensor:
    """Each model scaled to mean norm sqrt(d): both contenders then see the same numbers."""
    return acts * (acts.shape[-1] ** 0.5 / acts.norm(dim=-1).mean(0))[None, :, None]


def load_acts(args: argparse.Namespace) -> torch.Tensor:
    if args.store:
        from crossdiff.activations import ActivationStore

        store = ActivationStore(args.store)
        return normalized(store.read_acts(0, min(store.n_tokens, args.tokens)).float())
    acts, _ = planted_crosscoder_data(
        args.tokens,
        args.d_model,
        4 * args.d_model,
        2 * args.d_model,
        2 * args.d_model,
        densities=(0.002, 0.05),
        noise=0.2,
        seed=0,
    )
    return normalized(acts)


def train_saelens(acts: torch.Tensor, args: argparse.Namespace, lr: float) -> tuple[object, float]:
    n, m, d = acts.shape
    flat = acts.reshape(n, m * d)
    cfg = BatchTopKTrainingSAEConfig(
        d_in=m * d,
        d_sae=args.d_sae,
        k=args.k,
        aux_loss_coefficient=1 / 32,
        rescale_acts_by_decoder_norm=True,
    )
    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(flat[:65536].mean(0))

    def batches():
        epoch = 0
        while True:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            for j in range(n // args.batch_size):
                yield flat[perm[j * args.batch_size : (j + 1) * args.batch_size]]
            epoch += 1

    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=lr,
        lr_end=lr,
        lr_warm_up_steps=max(1, args.steps // 20),
        lr_decay_steps=int(args.steps * 0.2),
        dead_feature_window=max(1, args.steps // 10),
        feature_sampling_window=args.steps,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(trainer_cfg, sae, batches())
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    return sae, args.steps * args.batch_size / seconds


@torch.no_grad()
def saelens_fve(sae, acts: torch.Tensor, batch_size: int) -> dict[str, object]:
    n, m, d = acts.shape
    meter = ReconstructionMeter(m, d)
    active = 0
    sae.eval()
    for start in range(0, n, batch_size):
        x = acts[start : start + batch_size]
        f = sae.encode(x.reshape(x.shape[0], m * d))
        meter.update(x, sae.decode(f).reshape(x.shape))
        active += int((f > 0).sum())
    return {"fve": meter.fve(), "fve_per_model": meter.fve_per_model(), "l0": active / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (about a minute)")
    parser.add_argument("--store", type=Path, default=None, help="use a harvested store")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=None)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sweep", action="store_true", help="the grid of shapes (throughput)")
    parser.add_argument(
        "--points", default="small", help="sweep subset: small, medium, large, all, or a list of "
        "names like 64x8k6b1024 (inputs per model x expansion, k, batch), comma-separated"
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="sweep: runs per contender")
    parser.add_argument(
        "--point-seconds", type=float, default=60.0,
        help="sweep: the time one run of a point may take; longer points train fewer steps",
    )  # fmt: skip
    parser.add_argument(
        "--max-gib", type=float, default=4.0,
        help="sweep: points whose training state would exceed this are not run",
    )  # fmt: skip
    parser.add_argument(
        "--min-steps", type=int, default=8,
        help="sweep: the fewest steps a run of a point trains (a handful at the largest shapes)",
    )  # fmt: skip
    parser.add_argument("--estimate", action="store_true", help="sweep: print the plan only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        from crosscoder_sweep import run_sweep

        run_sweep(args, train_saelens, planted=load_acts)
        return
    args.out = args.out or Path("benchmarks/out/bench_crosscoder.json")
    args.tokens = args.tokens or (32768 if args.quick else 131072)
    args.steps = args.steps or (100 if args.quick else 600)

    acts = load_acts(args)
    n, m, d = acts.shape
    args.d_model = d
    args.d_sae = args.d_sae or 8 * m * d
    lr = default_lr(args.d_sae)
    eval_acts = acts[: min(n, 16384)]
    print(
        f"activations {tuple(acts.shape)}, d_sae {args.d_sae}, k {args.k}, "
        f"batch {args.batch_size}, steps {args.steps}, lr {lr:.2e}, "
        f"threads {torch.get_num_threads()}"
    )

    # warm both code paths once so neither pays first-call costs inside its timing
    cfg = CrossCoderConfig(n_models=m, d_model=d, d_sae=args.d_sae, k=args.k)
    train_crosscoder(acts, cfg, steps=3, batch_size=args.batch_size, lr=lr, log_every=10**9)
    train_saelens(acts, argparse.Namespace(**{**vars(args), "steps": 3}), lr)

    sae, saelens_tps = train_saelens(acts, args, lr)
    cc = train_crosscoder(
        acts, cfg, steps=args.steps, batch_size=args.batch_size, lr=lr, log_every=10**9
    )
    ours_tps = cc.training_summary["tokens_per_second"]
    ours = evaluate_crosscoder(cc, eval_acts, batch_size=4096)
    theirs = saelens_fve(sae, eval_acts, 4096)
    result = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "shape": [n, m, d],
        "d_sae": args.d_sae,
        "k": args.k,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": lr,
        "store": str(args.store) if args.store else None,
        "crossdiff_tokens_per_s": ours_tps,
        "saelens_tokens_per_s": saelens_tps,
        "throughput_ratio": ours_tps / saelens_tps,
        "crossdiff_fve_at_l0_k": ours["fve_topk"],
        "crossdiff_fve_per_model": ours["fve_topk_per_model"],
        "crossdiff_l0": ours["l0_topk"],
        "crossdiff_fve_threshold": ours["fve"],
        "crossdiff_l0_threshold": ours["l0"],
        "saelens_fve_at_l0_k": theirs["fve"],
        "saelens_fve_per_model": theirs["fve_per_model"],
        "saelens_l0": theirs["l0"],
        "fve_difference": ours["fve_topk"] - theirs["fve"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"throughput: crossdiff {ours_tps:,.0f} tok/s, SAELens {saelens_tps:,.0f} tok/s, "
        f"ratio {result['throughput_ratio']:.2f}x"
    )
    print(
        f"FVE at L0={args.k}: crossdiff {ours['fve_topk']:.4f}, SAELens {theirs['fve']:.4f} "
        f"(difference {result['fve_difference']:+.4f}); crossdiff with its threshold: "
        f"FVE {ours['fve']:.4f} at L0 {ours['l0']:.1f}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
