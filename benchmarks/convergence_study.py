"""The crosscoder convergence study (issue 24): how FVE, dead latents, seed stability, the spread of
relative norms and the class counts move with training tokens, k and the auxiliary-loss weight,
on one finished store. Each grid point trains two crosscoder seeds on the store's training part
and evaluates them on its held-out part. Results go to OUT/study.jsonl, one line per point, and a
point already there is skipped, so an interrupted study resumes; OUT/study.png draws them.

    .venv/bin/python benchmarks/convergence_study.py runs/tiny-n3/store runs/study-tiny \\
        --tokens 1228800,4915200,19660800 --k 8,16,32 --aux 0.03125,0.25

A long experiment: run it once, in the background, and record its command and figures in
docs/findings.md; it is not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any


def _point(store: Any, point: tuple, args: argparse.Namespace) -> dict:
    import numpy as np

    from crossdiff import CrossCoderConfig, diff_features, evaluate_crosscoder, train_crosscoder
    from crossdiff.analysis.stability import seed_stability

    tokens, k, aux, shared, normalize = point
    d_model = store.d_model
    d_sae = args.expansion * d_model
    cfg = CrossCoderConfig(
        n_models=store.n_models,
        d_model=d_model,
        d_sae=d_sae,
        k=k,
        n_shared=round(shared * d_sae),
        shared_decoder=args.shared_decoder,
    )
    steps = max(1, tokens // args.batch_size)
    t0 = time.perf_counter()
    crosscoders, diffs, metrics = [], [], []
    for seed in args.seeds:
        cc = train_crosscoder(store, cfg, steps=steps, batch_size=args.batch_size,
                              aux_loss_coefficient=aux, normalize=normalize, seed=seed,
                              log_every=10**9)  # fmt: skip
        crosscoders.append(cc)
        metrics.append(evaluate_crosscoder(cc, store, max_tokens=args.eval_tokens,
                                           splice_sequences=0))  # fmt: skip
        diffs.append(diff_features(cc, store, max_tokens=args.eval_tokens, n_top_contexts=1,
                                   panels_per_class=0, latent_scaling=False,
                                   show_progress=False))  # fmt: skip
    labels = [d.table["class"].to_numpy().astype(str) for d in diffs]
    st = seed_stability(crosscoders, live=[t != "dead" for t in labels], classes=labels[0])
    r = diffs[0].table["relative_norm"].to_numpy()[labels[0] != "dead"]
    n_train = store.part("train").n_tokens
    return {
        "tokens": tokens,
        "k": k,
        "aux": aux,
        "n_shared_fraction": shared,
        "shared_decoder": args.shared_decoder,
        "normalize": normalize,
        "steps": steps,
        "expansion": args.expansion,
        "passes_over_store": tokens / n_train,
        "seconds": time.perf_counter() - t0,
        "fve": [m["fve"] for m in metrics],
        "dead_fraction": [m["dead_fraction"] for m in metrics],
        "stability_0.7": st["share_matched"]["0.7"]["all"]["mean"],
        "stability_by_class_0.7": {c: v["mean"] for c, v in st["share_matched"]["0.7"].items()},
        "n_stable": st["n_stable"]["all"],
        "r_sd": float(np.std(r, ddof=1)),
        "r_range": [float(r.min()), float(r.max())],
        "class_counts": [d.summary["class_counts"] for d in diffs],
    }


def _key(row: dict[str, Any]) -> tuple:
    return (row["tokens"], row["k"], row["aux"], row.get("n_shared_fraction", 0.0),
            row.get("normalize", True))  # fmt: skip


def _label(row: dict[str, Any]) -> str:
    extra = f", {row['n_shared_fraction']:g} shared" if row.get("n_shared_fraction") else ""
    raw = "" if row.get("normalize", True) else ", raw"
    return f"k {row['k']}, aux {row['aux']:g}{extra}{raw}"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("fve", "FVE (mean of seeds)"),
        ("dead_fraction", "dead fraction"),
        ("stability_0.7", "share matched at cosine 0.7"),
        ("r_sd", "sd of relative norm"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for _, group in itertools.groupby(
            sorted(rows, key=lambda r: (_key(r)[1:], r["tokens"])), key=lambda r: _key(r)[1:]
        ):
            group = list(group)
            ys = [sum(r[key]) / len(r[key]) if isinstance(r[key], list) else r[key] for r in group]
            ax.plot([r["tokens"] for r in group], ys, marker="o", label=_label(group[0]))
        ax.set_xscale("log")
        ax.set_xlabel("crosscoder training tokens")
        ax.set_title(title)
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path, help="a finished store folder")
    parser.add_argument("out", type=Path, help="where study.jsonl and study.png go")
    parser.add_argument("--tokens", default="1228800,4915200,19660800")
    parser.add_argument("--k", default="8,16,32")
    parser.add_argument("--aux", default="0.03125,0.25")
    parser.add_argument("--shared", default="0", help="designated shared latents (share of d_sae)")
    parser.add_argument("--shared-decoder", choices=("free", "tied"), default="tied")
    parser.add_argument("--normalize", default="1", help="1 scaled per model, 0 raw activations")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    from crossdiff.activations import ActivationStore

    store = ActivationStore(args.store)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "study.jsonl"
    rows = (
        [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    )
    done = {_key(r) for r in rows if r.get("expansion", 8) == args.expansion}
    grid = itertools.product(
        (int(t) for t in args.tokens.split(",")),
        (int(k) for k in args.k.split(",")),
        (float(a) for a in args.aux.split(",")),
        (float(f) for f in args.shared.split(",")),
        (bool(int(n)) for n in args.normalize.split(",")),
    )
    for point in grid:
        if point in done:
            continue
        row = _point(store, point, args)
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = ("tokens", "k", "aux", "n_shared_fraction", "normalize", "stability_0.7", "r_sd",
                 "seconds")  # fmt: skip
        print(json.dumps({key: row[key] for key in shown}))
    _plot(rows, args.out / "study.png")
    print(f"wrote {results} and {args.out / 'study.png'}")


if __name__ == "__main__":
    main()
