"""One figure of several convergence studies (benchmarks/convergence_study.py): seed stability,
FVE, dead fraction and the spread of relative norms against training tokens, one line per
setting and store.

    .venv/bin/python benchmarks/convergence_figure.py docs/figures/convergence.png \\
        300k=runs/study/tiny-300k/study.jsonl 300k=runs/study/tiny-300k-x4/study.jsonl \\
        2M=runs/study/tiny-2m/study.jsonl 2M=runs/study/tiny-2m-x4/study.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

PANELS = (
    ("stability_0.7", "live latents matched at cosine >= 0.7"),
    ("fve", "FVE (mean of seeds)"),
    ("dead_fraction", "dead fraction (mean of seeds)"),
    ("r_sd", "sd of relative norm (seed 0)"),
)


def _setting(row: dict[str, Any]) -> tuple:
    return (row["store"], row["k"], row["aux"], row.get("n_shared_fraction", 0.0),
            row.get("normalize", True), row.get("expansion", 8))  # fmt: skip


def _label(setting: tuple) -> str:
    store, k, aux, shared, normalize, expansion = setting
    parts = [f"{store} store", f"k {k}"]
    parts += [f"expansion {expansion}"] if expansion != 8 else []
    parts += [f"{shared:g} designated shared"] if shared else []
    parts += ["raw activations"] if not normalize else []
    parts += [f"aux {aux:g}"] if aux != 0.25 else []
    return ", ".join(parts)


def _mean(value: Any) -> float:
    return sum(value) / len(value) if isinstance(value, list) else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("studies", nargs="+", help="LABEL=path/to/study.jsonl")
    args = parser.parse_args()
    rows = []
    for item in args.studies:
        label, _, path = item.partition("=")
        for line in Path(path).read_text().splitlines():
            rows.append(json.loads(line) | {"store": label})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for setting, group in itertools.groupby(
            sorted(rows, key=lambda r: (_setting(r), r["tokens"])), key=_setting
        ):
            group = list(group)
            xs = [r["tokens"] for r in group]
            ys = [_mean(r[key]) for r in group]
            ax.plot(xs, ys, marker="o", label=_label(setting))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("crosscoder training tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes.flat[0].text(axes.flat[0].get_xlim()[0], 0.5, " TopK SAE anchor (about half)",
                      va="bottom", fontsize=8, color="grey")  # fmt: skip
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=8)
    fig.suptitle("Crosscoder convergence on the tiny preset's models (d_model 128; expansion 8 "
                 "unless noted)")  # fmt: skip
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} from {len(rows)} points")


if __name__ == "__main__":
    main()
