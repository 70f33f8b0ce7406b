"""The report's matplotlib figures (Agg backend, colourblind-safe Okabe-Ito colours)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crossdiff.analysis.classes import DEAD, DESIGNATED, SHARED  # noqa: E402
from crossdiff.plumbing.common import atomic_path  # noqa: E402

# Okabe & Ito (2008): distinguishable with the common colour-vision deficiencies
OKABE_ITO = ["#0072B2", "#56B4E9", "#E69F00", "#D55E00", "#009E73", "#CC79A7", "#F0E442"]
GREY = "#999999"


def class_colors(classes: list[str]) -> dict[str, str]:
    a_only, b_only = classes[2], classes[3]
    return {DESIGNATED: OKABE_ITO[0], SHARED: OKABE_ITO[1], a_only: OKABE_ITO[2],
            b_only: OKABE_ITO[3], DEAD: GREY}  # fmt: skip


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def relative_norm_histogram(table, summary: dict[str, Any], path: Path) -> Path:
    classes = summary["classes"]
    colors = class_colors(classes)
    lo, hi = summary["split"]["lo"], summary["split"]["hi"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    bins = np.linspace(0, 1, 51)
    present = [c for c in classes if (table["class"] == c).any()]
    values = [table.loc[table["class"] == c, "relative_norm"].dropna().to_numpy() for c in present]
    labels = [f"{c} ({summary['class_counts'][c]})" for c in present]
    ax.hist(values, bins=bins, stacked=True, color=[colors[c] for c in present], label=labels)
    for x in (lo, hi):
        ax.axvline(x, color="black", linestyle="--", linewidth=1)
    ax.text(lo, ax.get_ylim()[1] * 0.97, f" {lo:g}", va="top", fontsize=9)
    ax.text(hi, ax.get_ylim()[1] * 0.97, f" {hi:g}", va="top", fontsize=9)
    d = summary["direction"]
    ax.set_xlabel(f"relative decoder norm  {d['relative_norm']}")
    ax.set_ylabel("number of latents")
    ax.set_title(f"Relative decoder norm by class ({summary['split']['name']} split)")
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


def decoder_cosine_histogram(table, summary: dict[str, Any], path: Path) -> Path | None:
    shared = table[table["class"].isin([SHARED, DESIGNATED])]["decoder_cosine"].dropna()
    if shared.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    ax.hist(shared.to_numpy(), bins=np.linspace(-1, 1, 41), color=OKABE_ITO[1], edgecolor="white")
    ax.set_xlabel("cosine between the two models' decoder vectors")
    ax.set_ylabel("number of shared latents")
    title = "Decoder cosine of shared latents"
    if not summary["decoder_cosine"]["meaningful"]:
        title += "\n(unrelated bases: not meaningful, shown for completeness)"
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def density_by_class(table, summary: dict[str, Any], path: Path) -> Path | None:
    classes = [c for c in summary["classes"] if c != DEAD and (table["class"] == c).any()]
    if not classes:
        return None
    colors = class_colors(summary["classes"])
    logd = [np.log10(table.loc[table["class"] == c, "density"].to_numpy()) for c in classes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    positions = np.arange(len(classes))
    for i, (c, v) in enumerate(zip(classes, logd, strict=True)):
        if len(v) > 1 and np.ptp(v) > 0:
            parts = left.violinplot([v], positions=[i], showextrema=False, widths=0.8)
            for body in parts["bodies"]:
                body.set_facecolor(colors[c])
                body.set_alpha(0.6)
        left.scatter(np.full(len(v), i) + np.random.default_rng(0).uniform(-0.08, 0.08, len(v)),
                     v, s=4, color=colors[c], alpha=0.5)  # fmt: skip
        left.hlines(np.median(v), i - 0.3, i + 0.3, color="black", linewidth=2)
    left.set_xticks(positions, [f"{c}\n(n={len(v)})" for c, v in zip(classes, logd, strict=True)])
    left.set_ylabel("log10 activation density (fraction of tokens)")
    left.set_title("Density per class (bar: median)")
    lo_edge = min(float(v.min()) for v in logd)
    hi_edge = max(float(v.max()) for v in logd)
    bins = np.linspace(lo_edge - 0.05, hi_edge + 0.05, 40)
    for c, v in zip(classes, logd, strict=True):
        right.hist(v, bins=bins, density=True, histtype="step", linewidth=2, color=colors[c],
                   label=c)  # fmt: skip
    right.set_xlabel("log10 activation density")
    right.set_ylabel("fraction of the class's latents (normalised)")
    right.set_title("Density distributions")
    right.legend(frameon=False, fontsize=9)
    pieces = []
    for c in summary["claims"]:
        if c["effect_name"] != "Cliff's delta":
            continue
        tested = c["p_holm"] is not None
        detail = f" (Cliff's delta {c['effect']:.2f}, Holm p = {c['p_holm']:.2g})" if tested else ""
        pieces.append(f"{c['claim']}: {c['verdict']}{detail}")
    fig.suptitle("\n".join(pieces), fontsize=9)
    return _save(fig, path)


def domain_shares(table, summary: dict[str, Any], path: Path) -> Path | None:
    dom = summary["domains"]
    if not dom.get("recorded"):
        return None
    names = dom["names"]
    classes = [c for c in summary["classes"] if c != DEAD and dom["mean_lift_per_class"].get(c)]
    if not classes:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(names)
    palette = [OKABE_ITO[0], OKABE_ITO[4], OKABE_ITO[5], OKABE_ITO[2], OKABE_ITO[1]]
    for i, name in enumerate(names):
        vals = [dom["mean_lift_per_class"][c][name] or 0.0 for c in classes]
        xs = np.arange(len(classes)) + (i - (len(names) - 1) / 2) * width
        color = palette[i % len(palette)]
        label = f"{name} (tokens: {dom['token_share'][name]:.0%})"
        ax.bar(xs, vals, width, color=color, label=label)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(classes)), classes)
    ax.set_ylabel("mean lift: mass share / token share")
    ax.set_ylim(0, 1.25 * max(1.0, *(b.get_height() for b in ax.patches)))
    ax.set_title("Where each class fires: domain lift (dotted: 1 = no preference)")
    ax.legend(frameon=False, fontsize=9, loc="upper center", ncol=len(names))
    return _save(fig, path)


def expert_entropy(table, summary: dict[str, Any], path: Path) -> Path | None:
    """Left: bias-corrected expert entropy per class (in each latent's top layer). Right, when
    the summary has it: each class's routing lift per (layer, expert) pair, on a log2 scale."""
    ex = summary["experts"]
    if not ex.get("recorded") or "expert_entropy" not in table:
        return None
    classes = [c for c in summary["classes"] if c != DEAD]
    data = [table.loc[table["class"] == c, "expert_entropy"].dropna().to_numpy() for c in classes]
    keep = [(c, d) for c, d in zip(classes, data, strict=True) if len(d)]
    if not keep:
        return None
    colors = class_colors(summary["classes"])
    lift = ex.get("class_lift") or {}
    fig, axes = plt.subplots(1, 2 if lift else 1, figsize=(13 if lift else 8, 4.2), squeeze=False)
    ax = axes[0, 0]
    box = ax.boxplot([d for _, d in keep], patch_artist=True, showfliers=False)
    for patch, (c, _) in zip(box["boxes"], keep, strict=True):
        patch.set_facecolor(colors[c])
    ax.set_xticks(np.arange(1, len(keep) + 1), [c for c, _ in keep])
    if ex.get("routing_entropy") is not None:
        ax.axhline(ex["routing_entropy"], color="black", linestyle="--", linewidth=1,
                   label="all tokens' routing entropy")  # fmt: skip
    if ex.get("max_entropy") is not None:
        ax.axhline(ex["max_entropy"], color=GREY, linestyle=":", linewidth=1,
                   label="uniform over experts")  # fmt: skip
    ax.set_ylabel("routed-expert entropy where it fires (bits)")
    ax.set_title("Expert entropy per class (bias-corrected; low: tied to few experts)")
    ax.legend(frameon=False, fontsize=9)
    if lift:
        _lift_heatmap(axes[0, 1], lift, ex)
    return _save(fig, path)


def _lift_heatmap(ax: Any, lift: dict[str, list[list[Any]]], ex: dict[str, Any]) -> None:
    names = list(lift)
    grid = np.array(
        [[np.nan if v is None else v for layer in lift[c] for v in layer] for c in names],
        dtype=float,
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log2(grid)
    bound = max(float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0, 0.1)
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound,
                      interpolation="nearest")  # fmt: skip
    ax.set_yticks(np.arange(len(names)), names)
    edges = np.cumsum([0, *ex["n_experts_per_layer"]])
    for edge in edges[1:-1]:
        ax.axvline(edge - 0.5, color="black", linewidth=1)
    ax.set_xticks((edges[:-1] + edges[1:]) / 2 - 0.5, [f"layer {x}" for x in ex["layers"]])
    experts = [str(e) for n in ex["n_experts_per_layer"] for e in range(n)]
    ax.set_xticks(np.arange(len(experts)), experts, minor=True, fontsize=7)
    ax.tick_params(axis="x", which="major", pad=12, length=0)
    ax.set_xlabel("expert within each layer (layer-major)")
    ax.set_title("Routing lift per (layer, expert) where each class fires")
    ax.figure.colorbar(image, ax=ax, label="log2 lift over the layer's base rate")


def fve_per_model(table, summary: dict[str, Any], path: Path) -> Path | None:
    rec = summary["reconstruction"]
    names = list(rec["fve_per_model"]) + ["all models"]
    vals = [rec["fve_per_model"][n] for n in names[:-1]] + [rec["fve"]]
    if any(v is None for v in vals):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = [OKABE_ITO[2], OKABE_ITO[3], OKABE_ITO[5], OKABE_ITO[4]][: len(names) - 1]
    bars = ax.bar(names, vals, color=[*colors, OKABE_ITO[0]])
    for bar, v in zip(bars, vals, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, min(v, 1.0), f"{v:.3f}", ha="center",
                va="bottom")  # fmt: skip
    ax.set_ylim(min(0.0, min(vals)), 1.08)
    ax.set_ylabel("fraction of variance explained")
    ax.set_title(f"Reconstruction (L0 = {rec['l0']:.1f} latents per token)")
    return _save(fig, path)


def latent_scaling_scatter(table, summary: dict[str, Any], path: Path) -> Path | None:
    ls = summary["latent_scaling"]
    if not ls.get("computed"):
        return None
    x_col, y_col = ls.get("columns", ["nu_err", "nu_rec"])
    labels = {
        "scaling_ratio": "other/own fitted signal on the activations",
        "scaling_ratio_rec": "other's reconstruction without the latent / own signal",
        "nu_err": "nu_err: other/own beta on the error",
        "nu_rec": "nu_rec: other/own beta on the reconstruction",
    }
    plotted = {}
    for cls, tol in ls["tolerance"].items():
        rows = table[(table["class"] == cls) & table[x_col].notna() & table[y_col].notna()]
        if not rows.empty:
            plotted[cls] = (rows, tol)
    if not plotted:  # no model-specific latent has both ratios: an empty plot says nothing
        return None
    colors = class_colors(summary["classes"])
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for cls, (rows, tol) in plotted.items():
        ax.scatter(rows[x_col], rows[y_col], s=10, color=colors[cls], alpha=0.7,
                   label=f"{cls} ({int(rows['scaling_artifact'].sum())} flagged)")  # fmt: skip
        ax.axvline(tol, color=colors[cls], linestyle="--", linewidth=1)
        ax.axhline(tol, color=colors[cls], linestyle="--", linewidth=1)
    ax.set_xlabel(labels.get(x_col, x_col))
    ax.set_ylabel(labels.get(y_col, y_col))
    ax.set_title("Latent scaling of model-specific latents\n(beyond a dashed line: artifact)")
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


def seed_relative_norms(table, summary: dict[str, Any], path: Path) -> Path | None:
    """The joint crosscoder's relative norms for the main pair (dense_1 vs MoE_1) and one
    same-architecture pair of each architecture, with the three splits marked (only with model
    seeds): one peak whose tails a split calls classes looks the same in all three."""
    arch = summary.get("architectures")
    if not arch:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    edges = np.linspace(0.0, 1.0, 21)
    centers = (edges[:-1] + edges[1:]) / 2
    colors = {"main": OKABE_ITO[3], "same_a": OKABE_ITO[2], "same_b": OKABE_ITO[0]}
    for role, d in arch["relative_norms"].items():
        if not d.get("n"):
            continue
        share = np.asarray(d["histogram"], dtype=float) / d["n"]
        label = f"{' vs '.join(d['models'])} (sd {d['sd']:.3f})"
        ax.step(centers, share, where="mid", color=colors.get(role, GREY), linewidth=2, label=label)
    for lo in (0.1, 0.2, 0.3):
        for x in (lo, 1 - lo):
            ax.axvline(x, color=GREY, linestyle=":", linewidth=1)
    ax.set_xlabel("relative decoder norm r = |d_second| / (|d_first| + |d_second|)")
    ax.set_ylabel("share of live latents")
    ax.set_title("Relative norms in the joint crosscoder (dotted: the 0.1, 0.2, 0.3 splits)")
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


def seed_stability_curve(table, summary: dict[str, Any], path: Path) -> Path | None:
    """Share of live latents matched one-to-one in the other crosscoder seeds at or above each
    decoder cosine, per class (only with crosscoder seeds)."""
    st = (summary.get("replicates") or {}).get("seed_stability")
    if not st:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    x = np.asarray(st["curve"]["cosine"])
    for i, (cls, share) in enumerate(st["curve"]["share"].items()):
        if st["n_live"].get(cls, 0) == 0:
            continue
        y = np.array([np.nan if v is None else v for v in share], dtype=float)
        color = "black" if cls == "all" else OKABE_ITO[i % len(OKABE_ITO)]
        ax.plot(x, y, color=color, linewidth=2.5 if cls == "all" else 1.5,
                label=f"{cls} ({st['n_live'][cls]})")  # fmt: skip
    ax.axvline(st["stable_cosine"], color=GREY, linestyle=":", linewidth=1)
    ax.axhline(0.5, color=GREY, linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("decoder cosine of the one-to-one match")
    ax.set_ylabel("share of live latents matched at >= cosine")
    ax.set_title(f"Seed stability over {st['n_seeds']} crosscoder seeds (dashed: the anchor, 0.5)")
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


FIGURES: dict[str, tuple[str, Callable[..., Path | None]]] = {
    "relative_norm": ("Relative decoder norm by class", relative_norm_histogram),
    "density": ("Activation density per class", density_by_class),
    "decoder_cosine": ("Decoder cosine of shared latents", decoder_cosine_histogram),
    "domain_shares": ("Activation mass per domain, per class", domain_shares),
    "expert_entropy": ("Expert entropy per class", expert_entropy),
    "fve": ("Fraction of variance explained per model", fve_per_model),
    "latent_scaling": ("Latent scaling of model-specific latents", latent_scaling_scatter),
    "seed_relative_norms": ("Relative norms over model seeds", seed_relative_norms),
    "seed_stability": ("Seed stability of latents", seed_stability_curve),
}


def make_figures(table, summary: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write every figure that has data; returns name -> path."""
    out: dict[str, Path] = {}
    for name, (_, draw) in FIGURES.items():
        path = draw(table, summary, out_dir / f"{name}.png")
        if path is not None:
            out[name] = path
    return out
