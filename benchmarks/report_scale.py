"""The report at the paper's dictionary size: report.html's size, its open time in headless
Chromium, and the time to open one latent from its report_files/ shard, at 24,576 latents.

    .venv/bin/python benchmarks/report_scale.py                # 24,576 latents, 6,000 tokens
    .venv/bin/python benchmarks/report_scale.py --d-sae 1024   # a quick look

The FeatureDiff is real but untrained: a randomly initialised crosscoder (report_speed's inputs,
d_model 16) on random activations, analysed by diff_features, and written by write_report with
explorer_per_class = d_sae, so every live latent has explorer data (the sidecar's worst case).
Open time is the page's own `data-ready-ms` (navigation start to the table drawn and the explorer
ready, Chromium's clock) and the wall time of `chromium --headless --dump-dom` on the page less
the same on a blank page (the browser's start); the median of --repeats runs each.
Writes benchmarks/out/report_scale.json.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from report_speed import make_inputs  # noqa: E402

from crossdiff.analysis import diff_features  # noqa: E402
from crossdiff.report import write_report  # noqa: E402

PAPER_D_SAE = 24_576
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update"]  # fmt: skip


def build_report(out: Path, d_sae: int = PAPER_D_SAE, n_tokens: int = 6_000) -> dict[str, Path]:
    """write_report of an untrained d_sae-latent FeatureDiff into `out` (every live latent
    explored)."""
    cc, acts, metadata = make_inputs(n_tokens, 16, d_sae, l0=32)
    diff = diff_features(
        cc, acts, metadata=metadata, batch_size=1024, n_top_contexts=10, show_progress=False
    )
    return write_report(diff, out, quiet=True, explorer_per_class=d_sae)


def find_browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    raise SystemExit(
        "no headless browser found: install Debian's chromium (apt-get install chromium)"
    )


def dump_dom(browser: str, url: str) -> tuple[float, str]:
    """(wall seconds, the DOM after the page's load event)."""
    with tempfile.TemporaryDirectory(prefix="crossdiff-chromium-") as profile:
        t0 = time.perf_counter()
        result = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        return time.perf_counter() - t0, result.stdout


def attribute(dom: str, name: str) -> Any:
    match = re.search(rf'{name}="([^"]*)"', dom)
    if match is None:
        raise SystemExit(f"the page did not set {name}: it failed to open")
    return json.loads(html.unescape(match.group(1)))


def open_times(browser: str, page: Path, latent: int, repeats: int) -> dict[str, Any]:
    blank = page.parent / "blank.html"
    blank.write_text("<!DOCTYPE html><title>blank</title><p>blank</p>")
    walls, blanks, ready, opened = [], [], [], []
    for _ in range(repeats):  # alternating, so load drifts hit both alike
        wall, dom = dump_dom(browser, page.as_uri())
        assert attribute(dom, "data-errors") == [], attribute(dom, "data-errors")
        walls.append(wall)
        ready.append(float(attribute(dom, "data-ready-ms")))
        blanks.append(dump_dom(browser, blank.as_uri())[0])
        _, dom = dump_dom(browser, page.as_uri() + f"#selftest-open-{latent}")
        got = attribute(dom, "data-selftest")["explorer"]
        assert got["opened"] and got["shardsLoaded"] == 1, got
        opened.append(got["openMs"])
    return {
        "page_ready_ms": round(statistics.median(ready)),
        "chromium_wall_s": round(statistics.median(walls), 2),
        "blank_page_wall_s": round(statistics.median(blanks), 2),
        "open_s_less_browser_start": round(statistics.median(walls) - statistics.median(blanks), 2),
        "open_latent_from_shard_ms": round(statistics.median(opened)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-sae", type=int, default=PAPER_D_SAE)
    parser.add_argument("--tokens", type=int, default=6_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    browser = find_browser()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="crossdiff-report-scale-") as tmp:
        t0 = time.perf_counter()
        paths = build_report(Path(tmp) / "report", args.d_sae, args.tokens)
        t_write = time.perf_counter() - t0
        explorer = json.loads(paths["explorer"].read_text())
        latent = max(int(k) for k in explorer["latents"])
        sidecar = list(paths["sidecar"].iterdir())
        result = {
            "d_sae": args.d_sae,
            "n_tokens": args.tokens,
            "explored_latents": explorer["n_latents"],
            "report_html_mib": round(paths["html"].stat().st_size / 2**20, 2),
            "explorer_json_mib": round(paths["explorer"].stat().st_size / 2**20, 1),
            "sidecar_files": len(sidecar),
            "sidecar_mib": round(sum(p.stat().st_size for p in sidecar) / 2**20, 1),
            "largest_shard_kib": round(max(p.stat().st_size for p in sidecar) / 2**10),
            "rows_in_sidecar": (paths["sidecar"] / "rows.js").exists(),
            "diff_and_write_report_s": round(t_write, 1),
            **open_times(browser, paths["html"].resolve(), latent, args.repeats),
            "browser": subprocess.run(
                [browser, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip(),  # fmt: skip
            "note": "measured on a shared 2-core CPU under load; the browser start is subtracted",
        }
    print(json.dumps(result, indent=2))
    out_path = Path(__file__).parent / "out" / "report_scale.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
