"""report.html (figures as base64 PNG, plain JS, no network) and its sidecar files in
report_files/ (the explorer's examples, and the latent table's rows when they are large;
sidecar.py says how they are loaded)."""

from __future__ import annotations

import base64
import html
import re
import struct
from pathlib import Path
from typing import Any

from crossdiff.analysis.explorer import visible_whitespace
from crossdiff.report.figures import class_colors
from crossdiff.report.markdown import (
    CLAIM_HEADER,
    ONE_MODEL_SEED,
    SEEDS_TITLE,
    claim_rows,
    fmt,
    fve_line,
)
from crossdiff.report.seeds_section import seeds_parts
from crossdiff.report.sidecar import (
    SIDECAR_DIR,
    explorer_index,
    explorer_shards,
    script_json,
    table_rows,
)

_TEMPLATE = Path(__file__).with_name("template.html")

# table columns: (key, header, kind); kind "num" sorts numerically
_BASE_COLUMNS = [
    ("latent", "latent", "num"),
    ("class", "class", "str"),
    ("relative_norm", "relative norm", "num"),
    ("decoder_cosine", "decoder cosine", "num"),
    ("density", "density", "num"),
    ("mean_activation", "mean act.", "num"),
    ("expert_entropy", "expert entropy", "num"),
    ("expert_kl", "expert KL", "num"),
    ("top_expert_layer", "top expert layer", "num"),
    ("top_expert", "top expert", "num"),
    ("top_expert_share", "top expert share", "num"),
    ("top_expert_lift", "top expert lift", "num"),
    ("scaling_ratio", "scaling ratio", "num"),
    ("scaling_ratio_rec", "scaling ratio rec", "num"),
    ("nu_err", "nu err", "num"),
    ("nu_rec", "nu rec", "num"),
    ("scaling_artifact", "artifact?", "str"),
]


def _columns(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    present = set(data["columns"])
    a, b = data["summary"]["direction"]["A"], data["summary"]["direction"]["B"]
    cols = [c for c in _BASE_COLUMNS if c[0] in present]
    cols[2:2] = [(f"norm_{a}", f"|d {a}|", "num"), (f"norm_{b}", f"|d {b}|", "num")]
    shares = [
        (k, k.removeprefix("share_"), "num") for k in data["columns"] if k.startswith("share_")
    ] + [
        (k, "lift " + k.removeprefix("lift_"), "num")
        for k in data["columns"]
        if k.startswith("lift_")
    ]
    at = next(i for i, c in enumerate(cols) if c[0] == "mean_activation") + 1
    cols[at:at] = shares
    return cols


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _bars(values: dict[str, float | None] | list[float], label: str) -> str:
    items = list(values.items()) if isinstance(values, dict) else list(enumerate(values))
    total = max([v or 0.0 for _, v in items] + [1e-12])
    rows = []
    for key, v in items:
        width = 100.0 * (v or 0.0) / total
        rows.append(
            f'<div class="bar"><span class="bar-label">{_esc(key)}</span>'
            f'<span class="bar-track"><span class="bar-fill" style="width:{width:.1f}%"></span>'
            f'</span><span class="bar-value">{fmt(v, 3)}</span></div>'
        )
    return f'<div class="bars"><div class="bars-title">{_esc(label)}</div>{"".join(rows)}</div>'


def _context_html(ctx: dict[str, Any]) -> str:
    peak = max(max(ctx["activations"]), 1e-12)
    spans = []
    for i, (tok, act) in enumerate(zip(ctx["tokens"], ctx["activations"], strict=True)):
        alpha = max(0.0, min(1.0, act / peak))
        cls = "tok center" if i == ctx["center"] else "tok"
        spans.append(
            f'<span class="{cls}" style="background:rgba(213,94,0,{alpha:.2f})" '
            f'title="activation {fmt(act, 3)}">{_esc(visible_whitespace(tok))}</span>'
        )
    domain = f' <span class="domain">{_esc(ctx["domain"])}</span>' if ctx["domain"] else ""
    return (
        f'<div class="context"><span class="ctx-act">{fmt(ctx["activation"], 3)}</span>'
        f'{domain}<span class="ctx-text">{"".join(spans)}</span></div>'
    )


def _panel(latent: int, row: dict[str, Any], detail: dict[str, Any], a: str, b: str) -> str:
    stats = [
        ("class", row["class"]),
        ("relative norm", fmt(row["relative_norm"], 3)),
        (f"|d {a}|", fmt(row.get(f"norm_{a}"), 3)),
        (f"|d {b}|", fmt(row.get(f"norm_{b}"), 3)),
        ("density", fmt(row["density"], 3)),
        ("mean activation", fmt(row["mean_activation"], 3)),
    ]
    top_layer = row.get("top_expert_layer")
    if top_layer is not None and top_layer >= 0:
        stats += [("top (layer, expert)", f"L{row['top_expert_layer']}E{row['top_expert']}, "
                   f"lift {fmt(row.get('top_expert_lift'), 3)}")]  # fmt: skip
    if row.get("scaling_ratio") is not None:
        stats += [("scaling ratio", fmt(row["scaling_ratio"], 3)),
                  ("scaling ratio rec", fmt(row.get("scaling_ratio_rec"), 3))]  # fmt: skip
    if row.get("nu_err") is not None:
        stats += [("nu err", fmt(row["nu_err"], 3)), ("nu rec", fmt(row["nu_rec"], 3))]
    if row.get("scaling_ratio") is not None or row.get("nu_err") is not None:
        stats += [("scaling artifact", fmt(row["scaling_artifact"]))]
    dl = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in stats)
    side = ""
    if detail.get("domain_shares"):
        side += _bars(detail["domain_shares"], "activation mass per domain")
    lift = {k.removeprefix("lift_"): v for k, v in row.items() if k.startswith("lift_")}
    if lift:
        side += _bars(lift, "domain lift: mass share / token share (1 = no preference)")
    if detail.get("expert_layers"):
        for lay in detail["expert_layers"]:
            side += _bars({f"L{lay['layer']}E{i}": v for i, v in enumerate(lay["share"])},
                          f"layer {lay['layer']}: routed experts where it fires "
                          f"({lay['firings']} firings)")  # fmt: skip
    elif detail.get("expert_counts"):
        counts = detail["expert_counts"]
        total = max(sum(counts), 1)
        side += _bars({f"expert {i}": c / total for i, c in enumerate(counts)},
                      "routed experts where it fires")  # fmt: skip
    contexts = "".join(_context_html(c) for c in detail["contexts"]) or "<p>no contexts</p>"
    return (
        f'<section class="panel" id="latent-{latent}"><h3>latent {latent} '
        f'<span class="pill" data-class="{_esc(row["class"])}">{_esc(row["class"])}</span></h3>'
        f'<div class="panel-body"><div><dl>{dl}</dl>{side}</div>'
        f'<div class="contexts"><div class="bars-title">top contexts</div>{contexts}</div></div>'
        "</section>"
    )


def _figure(name: str, title: str, path: Path) -> str:
    raw = path.read_bytes()
    encoded = base64.b64encode(raw).decode("ascii")
    # a figure with several panels (wider than 2:1) gets the page's full width
    width, height = struct.unpack(">II", raw[16:24])
    wide = ' class="wide"' if width > 2 * height else ""
    return (
        f'<figure id="fig-{name}"{wide}><img alt="{_esc(title)}" '
        f'src="data:image/png;base64,{encoded}">'
        f"<figcaption>{_esc(title)}</figcaption></figure>"
    )


def _spliced_loss_facts(sp: dict[str, Any] | None) -> list[tuple[str, str]]:
    """CE clean / spliced / ablated and loss recovered per model (all sites spliced at once)."""
    facts: list[tuple[str, str]] = []
    for name, r in (sp or {}).get("models", {}).items():
        facts += [
            (f"CE {name} clean / spliced", f"{fmt(r['ce_clean'])} / {fmt(r['ce_spliced'])}"),
            (f"CE {name} zero / mean-ablated",
             f"{fmt(r['ce_zero_ablated'])} / {fmt(r['ce_mean_ablated'])}"),
            (f"loss recovered {name} (vs zero / mean)",
             f"{fmt(r['loss_recovered_zero'], 3)} / {fmt(r['loss_recovered_mean'], 3)}"),
        ]  # fmt: skip
    return facts


def _controls_html(summary: dict[str, Any]) -> str:
    """The model seeds' and crosscoder seeds' section, or "" (the page is then as without it)."""
    parts = seeds_parts(summary)
    if not parts:
        return ""
    out = [f'\n<h2 id="seeds">{SEEDS_TITLE}</h2>\n']
    for kind, value in parts:
        if kind == "table":
            header, rows = value
            out.append(
                '<table class="claims"><thead><tr>'
                + "".join(f"<th>{_esc(h)}</th>" for h in header)
                + "</tr></thead><tbody>"
                + "".join(
                    "<tr>" + "".join(f"<td>{_esc(fmt(v))}</td>" for v in row) + "</tr>"
                    for row in rows
                )
                + "</tbody></table>"
            )
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_esc(x)}</li>" for x in value) + "</ul>")
        else:
            css = ' class="notes"' if kind == "note" else ""
            out.append(f"<p{css}>{_esc(value)}</p>")
    return "".join(out)


def render_html(
    data: dict[str, Any], figures: dict[str, Path], explorer: dict[str, Any] | None = None
) -> str:
    """The page alone (its sidecar files: `render_report_html`)."""
    return render_report_html(data, figures, explorer)[0]


_SLOT = re.compile(r"\{\{[A-Z_]+\}\}")


def render_report_html(
    data: dict[str, Any], figures: dict[str, Path], explorer: dict[str, Any] | None = None
) -> tuple[str, dict[str, str]]:
    """(report.html's text, its sidecar files: name inside report_files/ -> text)."""
    s = data["summary"]
    a, b = s["direction"]["A"], s["direction"]["B"]
    cols = _columns(data)
    keys = [c[0] for c in cols]
    rows = [[row.get(k) for k in keys] for row in data["latents"]]
    by_id = {row["latent"]: row for row in data["latents"]}
    panels = "".join(_panel(int(k), by_id[int(k)], d, a, b) for k, d in data["details"].items())
    cards = "".join(
        f'<div class="card" data-class="{_esc(c)}"><div class="card-n">{s["class_counts"][c]}'
        f'</div><div class="card-label">{_esc(c)}</div></div>'
        for c in s["classes"]
    )
    rec = s["reconstruction"]
    facts = [
        ("tokens analysed", f"{fmt(s['n_tokens'])} ({s.get('evaluated_on', 'given')})"),
        ("latents", fmt(s["d_sae"])),
        ("split", f"{s['split']['name']}: {fmt(s['split']['lo'])} / {fmt(s['split']['hi'])}"),
        ("relative norm", s["direction"]["relative_norm"]),
        ("FVE (all)", fmt(rec["fve"])),
        *[(f"FVE {m}", fmt(v)) for m, v in rec["fve_per_model"].items()],
        ("FVE pooled, normalized units", fmt(rec.get("fve_pooled_normalized"))),
        ("L0 (threshold)", fmt(rec["l0"])),
    ]
    if rec.get("fve_topk") is not None:
        facts += [
            ("FVE top-k (all)", fmt(rec["fve_topk"])),
            *[(f"FVE top-k {m}", fmt(v)) for m, v in rec["fve_topk_per_model"].items()],
            (f"L0 (top-k, k = {fmt(rec['k'])})", fmt(rec["l0_topk"])),
        ]
    facts.append(("dead fraction", fmt(rec["dead_fraction"])))
    facts += _spliced_loss_facts(s.get("spliced_loss"))
    facts_html = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts)
    warnings = "".join(
        f'<p class="warning"><strong>Warning:</strong> {_esc(w)}</p>' for w in s["warnings"]
    )
    sentences = "".join(f"<li>{_esc(c['sentence'])}</li>" for c in s["claims"])
    claims_table = (
        '<table class="claims"><thead><tr>'
        + "".join(f"<th>{_esc(h)}</th>" for h in CLAIM_HEADER)
        + "</tr></thead><tbody>"
        + "".join(
            "<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in claim_rows(s)
        )
        + "</tbody></table>"
        + f'<p class="notes">{_esc(s["claims_method"]["caveat"])} Rule: '
        + f"{_esc(s['claims_method']['rule'])}.</p>"
    )
    notes = [s["split"]["rule"], "Decoder cosines: " + s["decoder_cosine"]["reason"] + "."]
    if s["latent_scaling"]["computed"]:
        notes.append("Latent scaling: " + s["latent_scaling"]["rule"] + ".")
    designated = s.get("designated")
    if designated and designated["n"]:
        counts = ", ".join(
            f"{k}: {v}" for k, v in designated.items() if k not in ("n", "shared_decoder")
        )
        notes.append(
            f"Designated shared latents ({designated['n']}, {designated['shared_decoder']} "
            f"decoders) by class: {counts}."
        )
    notes += [f"Spliced-in loss: {n}." for n in (s.get("spliced_loss") or {}).get("notes", [])]
    figs = "".join(
        _figure(name, info["title"], figures[name]) for name, info in data["figures"].items()
    )
    header = "".join(
        f'<th data-key="{_esc(k)}" data-kind="{kind}" data-col="{i}">{_esc(label)}</th>'
        for i, (k, label, kind) in enumerate(cols)
    )
    options = "".join(f'<option value="{_esc(c)}">{_esc(c)}</option>' for c in s["classes"])
    rows_json, sidecar = table_rows(rows)
    sidecar.update(explorer_shards(explorer))
    rows_src = "".join(
        f'<script src="{SIDECAR_DIR}/{name}" onerror="crossdiffMissing(this)"></script>'
        for name in sidecar
        if name == "rows.js"
    )
    page = _TEMPLATE.read_text(encoding="utf-8")
    replacements = {
        "{{TITLE}}": _esc(f"crossdiff report: {a} vs {b}"),
        "{{CARDS}}": cards,
        "{{FACTS}}": facts_html,
        "{{SENTENCES}}": sentences,
        "{{CLAIMS}}": (
            "" if s.get("architectures") else f'<p class="notes">{_esc(ONE_MODEL_SEED)}</p>'
        )
        + claims_table,
        "{{CONTROLS}}": _controls_html(s),
        "{{WARNINGS}}": warnings + f'<p class="notes">{_esc(fve_line(rec))}</p>',
        "{{NOTES}}": "".join(f"<li>{_esc(n)}</li>" for n in notes),
        "{{FIGURES}}": figs,
        "{{HEADER}}": header,
        "{{OPTIONS}}": options,
        "{{PANELS}}": panels or "<p>No latents fire, so there are no panels.</p>",
        "{{N_LATENTS}}": str(len(rows)),
        "{{ROWS_JSON}}": rows_json,
        "{{ROWS_SRC}}": rows_src,
        "{{PANEL_IDS_JSON}}": script_json([int(k) for k in data["details"]]),
        "{{COLORS_JSON}}": script_json(class_colors(s["classes"])),
        "{{EXPLORER_INDEX_JSON}}": script_json(explorer_index(explorer)),
    }
    # one pass: a value that holds "{{...}}" (a token's text, a model name) stays as it is
    page = _SLOT.sub(lambda m: replacements.get(m.group(), m.group()), page)
    return page, sidecar
