"""`crossdiff inspect RUN LATENT`: one latent's explorer panel in the terminal.

Reads report.json and explorer.json from a report folder (or RUN/report of a `crossdiff run`
folder): class, norms, density, domain lift, top (layer, expert), top and activation-band examples
with the latent's activations [bracketed], the activation histogram and logit effects.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from crossdiff.analysis.explorer import token_text, visible_whitespace
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.report.fileset import check_complete

_SPARK = "▁▂▃▄▅▆▇█"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print one latent's class, statistics, examples and logit effects",
        description=(
            "Print what the report knows about one latent: class, decoder norms, density, domain "
            "lift, top (layer, expert), top-activating and activation-band examples with the "
            "latent's activations in [brackets], its activation histogram and logit effects. RUN "
            "is a `crossdiff run` folder or a report folder (with report.json and explorer.json)."
        ),
    )
    parser.add_argument("run", type=Path, metavar="RUN", help="run folder or report folder")
    parser.add_argument("latent", type=int, metavar="LATENT", help="latent id")
    parser.add_argument("--n-top", type=int, default=10, help="top examples to show")
    parser.add_argument("--per-band", type=int, default=3, help="examples per activation band")
    parser.set_defaults(func=run_inspect)


def report_folder(run: Path) -> Path:
    for folder in (run, run / "report"):
        if (folder / "report.json").exists():
            return folder
    raise CrossdiffError(
        f"no report.json in {run} or {run / 'report'}; pass a `crossdiff run` folder or a report "
        "folder written by `crossdiff report`"
    )


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def format_context(ctx: dict[str, Any], vocab: dict[str, str], domains: list[str]) -> str:
    """One example on one line: active tokens as [token:activation], the example's own token
    in double brackets, newlines and tabs as visible marks."""
    parts = []
    for i, (tok, act) in enumerate(zip(ctx["t"], ctx["v"], strict=True)):
        text = visible_whitespace(token_text(vocab, tok))
        mark = f"[{text}:{act:.3g}]" if act > 0 else text
        parts.append(f"[{mark}]" if i == ctx["c"] else mark)
    domain = f" ({domains[ctx['d']]})" if ctx.get("d") is not None else ""
    return f"  {ctx['a']:8.4g}{domain}  {''.join(parts)}"


def histogram_line(counts: list[int]) -> str:
    top = max(counts + [1])
    return "".join(_SPARK[min(len(_SPARK) - 1, int(c / top * (len(_SPARK) - 1) + 0.999))]
                   if c else " " for c in counts)  # fmt: skip


def describe_latent(
    report: dict[str, Any],
    explorer: dict[str, Any] | None,
    latent: int,
    *,
    n_top: int = 10,
    per_band: int = 3,
) -> str:
    rows = report["latents"]
    if not 0 <= latent < len(rows):
        raise CrossdiffError(
            f"latent {latent} is out of range; this report has latents 0 to {len(rows) - 1}"
        )
    row = rows[latent]
    s = report["summary"]
    a, b = s["direction"]["A"], s["direction"]["B"]
    split = s["split"]
    lines = [
        f"latent {latent}: {row['class']}  ({split['name']} split {split['lo']:g}/{split['hi']:g}"
        f" on {s['direction']['relative_norm']})",
        f"  norms: |d {a}| {_num(row.get(f'norm_{a}'))}, |d {b}| {_num(row.get(f'norm_{b}'))}, "
        f"relative norm {_num(row.get('relative_norm'))}, decoder cosine "
        f"{_num(row.get('decoder_cosine'))}",
        f"  density {_num(row.get('density'))} ({row.get('fire_count')} firings on "
        f"{s.get('n_tokens')} {s.get('evaluated_on', 'analysed')} tokens), mean activation "
        f"{_num(row.get('mean_activation'))}",
    ]
    lifts = [(k.removeprefix("lift_"), v) for k, v in row.items() if k.startswith("lift_")]
    if lifts:
        shares = {k.removeprefix("share_"): v for k, v in row.items() if k.startswith("share_")}
        lines.append("  domain lift (mass share / token share): " + ", ".join(
            f"{d} {_num(v, 3)} (share {_num(shares.get(d), 3)})" for d, v in lifts))  # fmt: skip
    if row.get("top_expert_layer") is not None and row["top_expert_layer"] >= 0:
        lines.append(
            f"  top (layer, expert): L{row['top_expert_layer']}E{row['top_expert']}, share "
            f"{_num(row.get('top_expert_share'), 3)}, lift {_num(row.get('top_expert_lift'), 3)}, "
            f"expert entropy {_num(row.get('expert_entropy'), 3)} bits"
        )
    if row.get("scaling_ratio") is not None or row.get("nu_err") is not None:
        lines.append(
            f"  latent scaling: ratio {_num(row.get('scaling_ratio'), 3)}, ratio rec "
            f"{_num(row.get('scaling_ratio_rec'), 3)}, artifact "
            f"{_num(row.get('scaling_artifact'))}"
        )
    entry = (explorer or {}).get("latents", {}).get(str(latent))
    if entry is None:
        why = "no explorer.json in the report folder" if explorer is None else (
            "it is dead" if row["class"] == "dead" else "it is beyond the explorer's per-class "
            "limit (write the report with a larger explorer_per_class)")  # fmt: skip
        lines.append(f"no examples: {why}")
        return "\n".join(lines)
    vocab, domains = explorer["vocab"], explorer["domain_names"]
    spark = histogram_line(entry["hist"])
    lines.append(f"activation histogram over (0, {entry['max']:.4g}]: |{spark}|")
    lines.append(f"top activations ({min(n_top, len(entry['top']))} of {len(entry['top'])}):")
    lines += [format_context(c, vocab, domains) for c in entry["top"][:n_top]]
    n = len(entry["bands"])
    for band in range(n - 1, -1, -1):
        lo, hi = entry["max"] * band / n, entry["max"] * (band + 1) / n
        examples = entry["bands"][band][:per_band]
        lines.append(f"activation band ({lo:.3g}, {hi:.3g}]: {len(examples)} random examples")
        lines += [format_context(c, vocab, domains) for c in examples]
    for name, eff in (entry.get("logits") or {}).items():

        def fmt_tokens(pairs: list[list[Any]]) -> str:
            return ", ".join(f"{visible_whitespace(t)!r} {v:+.3g}" for t, v in pairs)

        lines.append(f"logit effects, {name}:")
        lines.append(f"  promotes:   {fmt_tokens(eff['top'])}")
        lines.append(f"  suppresses: {fmt_tokens(eff['bottom'])}")
    if not entry.get("logits"):
        lines.append(f"logit effects: none ({explorer.get('logit_note', 'not computed')})")
    return "\n".join(lines)


def read_report_file(path: Path) -> dict[str, Any]:
    """report.json or explorer.json as a dict; a damaged or cut-short file is a CrossdiffError
    that says how to write it again."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CrossdiffError(
            f"{path} is damaged or cut short ({err}); write the report again (`crossdiff "
            f"report ... --out {path.parent}`, or rerun the same `crossdiff run`)"
        ) from err
    if not isinstance(data, dict):
        raise CrossdiffError(
            f"{path} holds a JSON {type(data).__name__}, not a crossdiff report file; write "
            "the report again"
        )
    return data


def run_inspect(args: argparse.Namespace) -> int:
    folder = report_folder(args.run)
    check_complete(folder)
    report = read_report_file(folder / "report.json")
    explorer_path = folder / "explorer.json"
    explorer = None
    if explorer_path.exists():
        explorer = read_report_file(explorer_path)
    print(describe_latent(report, explorer, args.latent, n_top=args.n_top, per_band=args.per_band))
    return 0
