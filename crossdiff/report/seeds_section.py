"""The report's robustness section, before the claims: the main pair's exclusive counts at three
splits (summary["pair_splits"]), the latents attributed per latent over N model seeds with the
claims at three splits (summary["architectures"], crossdiff.analysis.architectures) and the
crosscoder seeds' spread and seed stability (summary["replicates"]), as parts that report.md and
report.html render alike: ('p', text), ('table', (header, rows)), ('list', [text]) or
('note', text)."""

from __future__ import annotations

from typing import Any

from crossdiff.report.numbers import fmt

Part = tuple[str, Any]


def mean_sd(spread: dict[str, Any]) -> str:
    """'mean ± sd (v1, v2, ...)'; the sd is left out for one value."""
    values = ", ".join(fmt(v) for v in spread["values"])
    sd = "" if spread["sd"] is None else f" ± {fmt(spread['sd'])}"
    return f"{fmt(spread['mean'])}{sd} ({values})"


def _ci(est: dict[str, Any]) -> str:
    if est["value"] is None:
        return "n/a"
    ci = "" if est["ci"] is None else f" [{fmt(est['ci'][0])}, {fmt(est['ci'][1])}]"
    return f"{fmt(est['value'])}{ci}"


def _class_rows(arch: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    splits = arch["splits"]
    header = ["class", *(f"latents at {name} [95% interval]" for name in splits)]
    classes = list(next(iter(splits.values()))["class_counts"])
    rows = [[c, *(_ci(s["class_counts"][c]) for s in splits.values())] for c in classes]
    rows.append(["shared, designated folded in (the paper's accounting)",
                 *(_ci(s["shared_with_designated"]) for s in splits.values())])  # fmt: skip
    return header, rows


def _claim_rows(arch: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["split", "claim", "effect", "estimate [95% interval]", "test", "n", "verdict"]
    rows = []
    n_m, n_c = arch["n_model_seeds"], arch["n_crosscoder_seeds"]
    for name, s in arch["splits"].items():
        for c in s["claims"]:
            perm = c.get("permutation")
            test = (
                f"permutation p = {fmt(perm['p'])} (rank {perm['rank']} of {perm['n_splits']})"
                if perm
                else "interval"
            )
            latents = c.get("n_latents")
            n = f"{n_m} + {n_m} models, {n_c} crosscoder(s)"
            if latents is not None:
                n += f", latents per crosscoder {latents}"
            verdict = c["verdict"] + (f" ({c['reason']})" if c["reason"] else "")
            rows.append([name, c["claim"], c["effect_name"], _ci(c["estimate"]), test, n, verdict])
    return header, rows


def _norm_rows(arch: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["pair", "models", "latents", "sd of r", "r: 1% / 50% / 99%", "range"]
    rows = []
    for role, d in arch["relative_norms"].items():
        if not d.get("n"):
            continue
        q = d["quantiles"]
        rows.append([role, " vs ".join(d["models"]), d["n"], d["sd"],
                     f"{fmt(q['q01'])} / {fmt(q['q50'])} / {fmt(q['q99'])}",
                     f"[{fmt(d['min'])}, {fmt(d['max'])}]"])  # fmt: skip
    return header, rows


def architecture_parts(arch: dict[str, Any]) -> list[Part]:
    models = "; ".join(f"{a}: {', '.join(m)}" for a, m in arch["architectures"].items())
    parts: list[Part] = [("list", arch["headline"])] if arch["headline"] else []
    parts += [
        ("p", f"One crosscoder over all {2 * arch['n_model_seeds']} models ({models}), "
              f"{arch['n_crosscoder_seeds']} crosscoder seed(s) of {fmt(arch['d_sae'])} "
              "latents. A latent is architecture-specific when every model of one architecture "
              "carries it and none of the other; seed-private when one model alone does. Counts "
              "at three splits, with 95% intervals over model seeds (jackknife) and crosscoder "
              "seeds."),
        ("table", _class_rows(arch)),
        ("table", _claim_rows(arch)),
        ("p", "Relative decoder norms r = |d_second| / (|d_first| + |d_second|) of the joint "
              "crosscoder's live latents, for the main pair and one same-architecture pair each:"),
        ("table", _norm_rows(arch)),
        ("note", f"Attribution: {arch['method']['attribution']}"),
        ("note", f"Tests: {arch['method']['rule']}"),
    ]  # fmt: skip
    return parts


def _stability_rows(st: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    thresholds = list(st["share_matched"])
    header = ["class", "live latents", *(f"matched at >= {t}" for t in thresholds), "stable"]
    rows = []
    for cls, n in st["n_live"].items():
        shares = [st["share_matched"][t][cls]["mean"] for t in thresholds]
        rows.append([cls, n, *shares, st["n_stable"][cls]])
    return header, rows


def _stable_lists(st: dict[str, Any], by_class: dict[str, list[int]]) -> list[str]:
    """The stable latents of each class (the first 40), the report's headline list."""
    out = []
    for cls, ids in by_class.items():
        shown = ", ".join(str(i) for i in ids[:40]) + (", ..." if len(ids) > 40 else "")
        out.append(f"stable {cls} latents ({len(ids)}): {shown or 'none'}")
    return out or [f"stable latents: {len(st['stable_latents'])}"]


def replicate_parts(rep: dict[str, Any]) -> list[Part]:
    seeds = ", ".join(fmt(s) for s in rep["seeds"])
    d = rep["direction"]
    figs = rep["figures"]
    named = [(f"latents: {c}", v) for c, v in figs["class_counts"].items()]
    named += [("FVE (all models)", figs["fve"])]
    named += [(f"FVE {m}", v) for m, v in figs["fve_per_model"].items()]
    rows = [[name, v["mean"], v["sd"], v["min"], v["max"], ", ".join(fmt(x) for x in v["values"])]
            for name, v in named]  # fmt: skip
    parts: list[Part] = [
        ("p", f"Crosscoder seeds of {d['A']} vs {d['B']} ({fmt(rep['n_seeds'])} seeds: {seeds})."),
        ("table", (["figure", "mean", "sd", "min", "max", "per seed"], rows)),
    ]
    st = rep.get("seed_stability")
    if st:
        parts += [
            ("p", f"Seed stability ({st['method']} matching of the first seed's live latents "
                  "against every other seed, per class of the first seed; the share matched at "
                  f"each decoder cosine, mean over the other seeds). {st['n_stable']['all']} of "
                  f"{st['n_live']['all']} live latents are stable (matched at >= "
                  f"{fmt(st['stable_cosine'])} in every other seed); the latent table's `stable` "
                  "column marks them, the rest are single-draw. The anchor: about half of a TopK "
                  "SAE's latents recur across seeds in small settings (Paulo and Belrose, 2025)."),
            ("table", _stability_rows(st)),
            ("list", _stable_lists(st, st.get("stable_by_class") or {})),
        ]  # fmt: skip
    if rep["note"]:
        parts.append(("note", f"{rep['note'][0].upper()}{rep['note'][1:]}."))
    return parts


def pair_split_parts(summary: dict[str, Any]) -> list[Part]:
    ps = summary["pair_splits"]
    a, b = summary["direction"]["A"], summary["direction"]["B"]
    parts: list[Part] = []
    if ps["nothing_exclusive"]:
        parts.append(("list", [
            f"No latent of {a} vs {b} is exclusive at 0.1/0.9: every live latent's relative norm "
            "lies between 0.1 and 0.9, so the classes at the paper's 0.3/0.7 split are the tails "
            "of one distribution, not separate populations."]))  # fmt: skip
    rows = []
    for name, c in ps["splits"].items():
        rows.append([name, c[f"{a}-only"], c[f"{b}-only"], c[f"{a}-only without artifacts"],
                     c[f"{b}-only without artifacts"]])  # fmt: skip
    r = ps["relative_norm"]
    spread = (
        f" Relative norms of the live latents: sd {fmt(r['sd'])}, range [{fmt(r['min'])}, "
        f"{fmt(r['max'])}], 1% / 99% quantiles {fmt(r['quantiles']['q01'])} / "
        f"{fmt(r['quantiles']['q99'])}."
        if r.get("n")
        else ""
    )
    parts += [
        ("p", f"Exclusive latents of {a} vs {b} at three splits, with and without the latents "
              f"latent scaling flags as artifacts.{spread}"),
        ("table", (["split", f"{a}-only", f"{b}-only", f"{a}-only without artifacts",
                    f"{b}-only without artifacts"], rows)),
    ]  # fmt: skip
    return parts


def seeds_parts(summary: dict[str, Any]) -> list[Part]:
    """The section's parts, or [] when the summary has none of its blocks."""
    parts: list[Part] = []
    if summary.get("pair_splits"):
        parts += pair_split_parts(summary)
    if summary.get("architectures"):
        parts += architecture_parts(summary["architectures"])
    if summary.get("replicates"):
        parts += replicate_parts(summary["replicates"])
    return parts
