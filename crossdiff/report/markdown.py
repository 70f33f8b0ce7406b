"""report.md: the summary as Markdown. Every number in it is read from report.json's data."""

from __future__ import annotations

from typing import Any

from crossdiff.report.numbers import fmt
from crossdiff.report.seeds_section import seeds_parts

_TOKENS = {
    "heldout": "held-out (never trained on)",
    "train": "training",
    "all": "all (training and held-out)",
    "given": "given",
}


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _experts_section(ex: dict[str, Any]) -> list[str]:
    """Routing per (layer, expert): the layers, the method, per-class means (and per layer)."""
    layers = ", ".join(fmt(x) for x in ex["layers"])
    out = [
        f"The MoE routes among {fmt(ex['n_experts'])} experts in each of {fmt(ex['n_layers'])} "
        f"recorded layer(s) (layers {layers}; {fmt(ex['n_pairs'])} (layer, expert) pairs; "
        f"column map: {ex['layout_source']}). The entropy of routing over all analysed tokens "
        f"is {fmt(ex['routing_entropy'])} bits, averaged over layers (uniform: "
        f"{fmt(ex['max_entropy'])} bits).",
        "",
        f"Method: {ex['method']}. {fmt(ex['n_below_min_firings'])} firing latents are below "
        f"the minimum of {fmt(ex['min_firings'])} firings and get no attribution.",
        "",
    ]
    rows = [
        [c, ex["mean_entropy_per_class"][c], ex["mean_kl_per_class"][c],
         ex["mean_lift_per_class"][c], ex["below_min_firings_per_class"][c]]
        for c in ex["mean_entropy_per_class"]
    ]  # fmt: skip
    out += _table(["class", "mean expert entropy (bits)", "mean KL to base rate (bits)",
                   "mean top-pair lift", "below minimum"], rows)  # fmt: skip
    if ex["n_layers"] > 1:
        out += ["Mean KL to the layer's base rate (bits), per layer:", ""]
        header = ["class"] + [f"layer {fmt(x)}" for x in ex["layers"]]
        out += _table(header, [[c, *v] for c, v in ex["mean_kl_per_class_per_layer"].items()])
    return out


CLAIM_HEADER = ["claim", "test", "n per class", "effect [CI]", "p", "Holm p", "verdict",
                "verdict without artifacts"]  # fmt: skip


def _effect_ci(name: str, c: dict[str, Any]) -> str:
    if c["ci"] is None:
        return f"{name} {fmt(c['effect'])}"
    return f"{name} {fmt(c['effect'])} [{fmt(c['ci'][0])}, {fmt(c['ci'][1])}]"


def claim_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per claim, cells as text (shared by report.md and report.html)."""
    rows = []
    for c in summary["claims"]:
        ex = c["excluding_artifacts"]
        rows.append([
            c["claim"], c["test"], ", ".join(f"{fmt(v)} {k}" for k, v in c["n"].items()),
            _effect_ci(c["effect_name"], c), fmt(c["p_value"]), fmt(c["p_holm"]), c["verdict"],
            "latent scaling not computed" if ex is None else
            ex["verdict"] if ex["p_holm"] is None else
            f"{ex['verdict']} ({_effect_ci(c['effect_name'], ex)}; Holm p {fmt(ex['p_holm'])})",
        ])  # fmt: skip
    return rows


def fve_line(rec: dict[str, Any]) -> str:
    """Both FVEs and both L0s in one sentence (threshold, and BatchTopK at k when measured)."""
    text = (
        f"FVE over all models: {fmt(rec['fve'])} with the inference threshold (L0 "
        f"{fmt(rec['l0'])} latents per token)"
    )
    if rec.get("fve_topk") is not None:
        text += (
            f", {fmt(rec['fve_topk'])} with BatchTopK at k = {fmt(rec['k'])} (L0 "
            f"{fmt(rec['l0_topk'])})"
        )
    return text + f"; dead fraction: {fmt(rec['dead_fraction'])}."


SEEDS_TITLE = "Robustness: splits, model seeds and crosscoder seeds"


def _seeds_section(summary: dict[str, Any]) -> list[str]:
    parts = seeds_parts(summary)
    if not parts:
        return []
    out = [f"## {SEEDS_TITLE}", ""]
    for kind, value in parts:
        if kind == "table":
            out += _table(*value)
        elif kind == "list":
            out += [f"- {x}" for x in value] + [""]
        elif kind == "note":
            out += [f"_{value}_", ""]
        else:
            out += [value, ""]
    return out


ONE_MODEL_SEED = (
    "One dense and one MoE model: these claims describe this pair, and cannot separate the "
    "architectures from what another initialization seed would change. `crossdiff run "
    "--model-seeds 3` trains three of each and judges the claims over model seeds."
)


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
    out += _seeds_section(s)
    method = s["claims_method"]
    out += ["## The paper's claims within the main pair", ""]
    if not s.get("architectures"):
        out += [ONE_MODEL_SEED, ""]
    out += [f"_{method['caveat']} Rule: {method['rule']}._", ""]
    out += _table(CLAIM_HEADER, claim_rows(s))
    for c in s["claims"]:
        out.append(f"- {c['sentence']}")
        if c["excluding_artifacts"] is not None:
            out.append(f"  - {c['excluding_artifacts']['sentence']}")
    out.append("")
    rec = s["reconstruction"]
    out += ["## Reconstruction", ""]
    topk = rec.get("fve_topk_per_model") or {}
    rows = [[name, rec["fve_per_model"][name], topk.get(name), rec["mse_per_model"][name]]
            for name in rec["fve_per_model"]]  # fmt: skip
    out += _table(["model", "FVE (threshold)", "FVE (top-k)", "MSE (threshold)"], rows)
    out += [
        fve_line(rec),
        "",
        f"Measured on {fmt(s['n_tokens'])} {_TOKENS.get(rec.get('evaluated_on'), 'analysed')} "
        f"tokens; pooled FVE in each model's normalized units: "
        f"{fmt(rec.get('fve_pooled_normalized'))}.",
        "",
    ]
    for warning in s.get("warnings", []):
        out += [f"**Warning:** {warning}", ""]
    out += [f"_{rec['formula']}._", ""]
    out += _spliced_loss_section(s.get("spliced_loss"))
    ex = s["experts"]
    out += ["## Experts", ""]
    if ex["recorded"]:
        out += _experts_section(ex)
    else:
        out += ["No routed experts were recorded in the store, so there is no expert analysis.", ""]
    dom = s["domains"]
    out += ["## Domains", ""]
    if dom["recorded"]:
        names = dom["names"]
        out += ["Domain lift per class: a latent's share of activation mass in a domain over "
                "that domain's share of tokens (1 = no preference), mean over the class's "
                "latents; the first row is the share of analysed tokens.", ""]  # fmt: skip
        rows = [["(token share)", *[dom["token_share"][n] for n in names]]]
        rows += [[c, *[(v or {}).get(n) for n in names]]
                 for c, v in dom["mean_lift_per_class"].items()]  # fmt: skip
        out += _table(["class", *[f"lift {n}" for n in names]], rows)
    else:
        out += ["No domain labels were recorded.", ""]
    ls = s["latent_scaling"]
    out += ["## Latent scaling", ""]
    if ls["computed"]:
        targets = "; ".join(f"{k} = {v}" for k, v in ls["targets"].items())
        out += [
            f"Computed for {fmt(ls['n_latents'])} model-specific latents; form: "
            f"{ls.get('form', 'n/a')}; direction: {ls['direction']}. Targets: {targets}. "
            f"Rule: {ls['rule']}.",
            "",
        ]
        rows = [[c, ls["n_flagged"][c], ls["tolerance"][c]] for c in ls["n_flagged"]]
        out += _table(["class", "flagged as artifact", "tolerance"], rows)
    else:
        out += ["Not computed (no live model-specific latents, or latent_scaling=False).", ""]
    designated = s.get("designated")
    if designated and designated["n"]:
        counts = {k: v for k, v in designated.items() if k not in ("n", "shared_decoder")}
        out += [
            "## Designated shared latents",
            "",
            f"{fmt(designated['n'])} designated latents, {designated['shared_decoder']} "
            "decoders; where they ended up:",
            "",
        ]
        out += _table(["class", "designated latents"], [[c, v] for c, v in counts.items()])
    out += _verification_section(s.get("verification"))
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


def _verification_section(v: dict[str, Any] | None) -> list[str]:
    """Screen-and-verify: per exclusive class, the verified share of the screened candidates."""
    if not v:
        return []
    rows = [[cls, b["n_candidates"], b["n_verified"], b["share_verified"],
             f"{fmt(b['interval_95'][0])}-{fmt(b['interval_95'][1])}"]
            for cls, b in v["per_class"].items()]  # fmt: skip
    out = ["## Screen-and-verify", "", f"Candidates: {v['score']}.", ""]
    if not rows:
        return [*out, "No live latent in an exclusive class: nothing to verify.", ""]
    return out + _table(["class", "candidates", "verified", "share", "95% interval"], rows)


def _spliced_loss_section(sp: dict[str, Any] | None) -> list[str]:
    """Each model's LM loss with its paired activations replaced by the reconstruction."""
    if not sp:
        return []
    out = [
        "## Spliced-in language-model loss",
        "",
        f"Mean next-token cross-entropy (nats) on {fmt(sp['n_sequences'])} held-out rows "
        f"({fmt(sp['n_targets'])} targets) with each model's paired activations replaced by the "
        "crosscoder's reconstruction (spliced), by zeros, or by their mean "
        f"({sp['mean_ablation']}); {sp['formula']}.",
        "",
    ]
    header = ["model", "sites", "CE clean", "CE spliced", "CE zero-ablated", "CE mean-ablated",
              "recovered (vs zero)", "recovered (vs mean)"]  # fmt: skip
    keys = ["ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated",
            "loss_recovered_zero", "loss_recovered_mean"]  # fmt: skip
    rows = []
    for name, r in sp["models"].items():
        rows.append([name, "all", *[r[k] for k in keys]])
        if len(r.get("per_site", [])) > 1:
            rows += [[name, site["hook"], *[site[k] for k in keys]] for site in r["per_site"]]
    out += _table(header, rows)
    out += [f"- {note}" for note in sp.get("notes", [])]
    return out + ([""] if sp.get("notes") else [])
