"""report.md: the summary as Markdown. Every number in it is read from report.json's data."""

from __future__ import annotations

from typing import Any

_TOKENS = {
    "heldout": "held-out (never trained on)",
    "train": "training",
    "all": "all (training and held-out)",
    "given": "given",
}


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers as the report shows them: ints exact, floats to `digits` significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(data: dict[str, Any]) -> str:
    s, cfg = data["summary"], data["config"]
    a, b = s["direction"]["A"], s["direction"]["B"]
    split = s["split"]
    out = [f"# crossdiff report: {a} vs {b}", ""]
    out += [
        f"Analysed {fmt(s['n_tokens'])} tokens (of {fmt(cfg['n_tokens_available'])}) with a "
        f"crosscoder of {fmt(s['d_sae'])} latents ({fmt(s['n_shared'])} designated shared).",
        "",
        f"**Class thresholds** ({split['name']} split, lo = {fmt(split['lo'])}, "
        f"hi = {fmt(split['hi'])}) on {s['direction']['relative_norm']}: {split['rule']}.",
        "",
        "## Classes",
        "",
    ]
    rows = []
    for cls in s["classes"]:
        dens = s["density"].get(cls, {})
        act = s["mean_activation"].get(cls, {})
        rows.append([cls, s["class_counts"][cls], dens.get("median"), dens.get("q1"),
                     dens.get("q3"), act.get("median")])  # fmt: skip
    out += _table(
        ["class", "latents", "density median", "density Q1", "density Q3", "mean activation"], rows
    )
    out += ["## Density claims", ""]
    for test in s["density_tests"].values():
        out.append(f"- {test['sentence']}")
    out.append("")
    rec = s["reconstruction"]
    out += ["## Reconstruction", ""]
    rows = [[name, rec["fve_per_model"][name], rec["mse_per_model"][name]]
            for name in rec["fve_per_model"]]  # fmt: skip
    out += _table(["model", "FVE", "MSE"], rows)
    out += [
        f"FVE over all models: {fmt(rec['fve'])}; mean active latents per token (threshold): "
        f"{fmt(rec['l0'])}; dead fraction: {fmt(rec['dead_fraction'])}.",
        "",
        f"Measured on {fmt(s['n_tokens'])} {_TOKENS.get(rec.get('evaluated_on'), 'analysed')} "
        f"tokens; pooled FVE in each model's normalized units: "
        f"{fmt(rec.get('fve_pooled_normalized'))}.",
        "",
        f"_{rec['formula']}._",
        "",
    ]
    ex = s["experts"]
    out += ["## Experts", ""]
    if ex["recorded"]:
        out += [
            f"The MoE routes among {fmt(ex['n_experts'])} experts; the entropy of routing over all "
            f"analysed tokens is {fmt(ex['routing_entropy'])} bits (uniform: "
            f"{fmt(ex['max_entropy'])} bits). Mean expert entropy where each class fires:",
            "",
        ]
        out += _table(["class", "mean expert entropy (bits)"],
                      [[c, v] for c, v in ex["mean_entropy_per_class"].items()])  # fmt: skip
    else:
        out += ["No routed experts were recorded in the store, so there is no expert analysis.", ""]
    dom = s["domains"]
    out += ["## Domains", ""]
    if dom["recorded"]:
        names = dom["names"]
        out += ["Share of each class's activation mass per domain (mean over its latents); the "
                "first row is the share of analysed tokens.", ""]  # fmt: skip
        rows = [["(tokens)", *[dom["token_share"][n] for n in names]]]
        rows += [[c, *[(v or {}).get(n) for n in names]]
                 for c, v in dom["mean_share_per_class"].items()]  # fmt: skip
        out += _table(["class", *names], rows)
    else:
        out += ["No domain labels were recorded.", ""]
    ls = s["latent_scaling"]
    out += ["## Latent scaling", ""]
    if ls["computed"]:
        out += [
            f"Computed for {fmt(ls['n_latents'])} model-specific latents; direction: "
            f"{ls['direction']}. Targets: error = {ls['targets']['err']}; reconstruction = "
            f"{ls['targets']['rec']}. Rule: {ls['rule']}.",
            "",
        ]
        rows = [[c, ls["n_flagged"][c], ls["tolerance"][c]] for c in ls["n_flagged"]]
        out += _table(["class", "flagged as artifact", "tolerance"], rows)
    else:
        out += ["Not computed (no live model-specific latents, or latent_scaling=False).", ""]
    cos = s["decoder_cosine"]
    out += [
        "## Decoder cosines",
        "",
        f"Meaningful: {fmt(cos['meaningful'])}: {cos['reason']}. Median over shared latents: "
        f"{fmt(cos['shared_median'])}.",
        "",
    ]
    if data.get("figures"):
        out += ["## Figures", ""]
        for fig in data["figures"].values():
            out += [f"![{fig['title']}]({fig['file']})", ""]
    if data.get("details"):
        out += ["## Latents shown in the HTML report", ""]
        by_id = {row["latent"]: row for row in data["latents"]}
        rows = []
        for key, detail in data["details"].items():
            row = by_id[int(key)]
            top = detail["contexts"][0]["activation"] if detail["contexts"] else None
            rows.append([row["latent"], row["class"], row["relative_norm"], row["density"],
                         row["mean_activation"], top])  # fmt: skip
        out += _table(
            ["latent", "class", "relative norm", "density", "mean activation", "top activation"],
            rows,
        )
    out += [
        "Full per-latent table: `report.json` (`latents`); interactive: `report.html`.",
        "",
    ]
    return "\n".join(out)
