"""report.html in a real headless browser (Debian's chromium): no console errors, the latent table
sorts on real click events, a latent typed into the explorer's search box opens with its
examples (newlines shown as marks, one line per example, only its shard of report_files/ loaded),
and a screenshot is not blank."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile

import matplotlib.image as mpimg
import pytest
import torch
from test_analysis_planted import planted

import crossdiff.report.sidecar as sidecar_module
from crossdiff.analysis import diff_features
from crossdiff.report import write_report
from crossdiff.report.writer import write_html

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def run_browser(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="crossdiff-chromium-") as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )


class NewlineTokenizer:
    """test_report_files' stub (with text to escape), plus newlines and tabs."""

    name = "newline-stub"

    def decode(self, ids: list[int]) -> str:
        return {0: "\n", 1: "\t"}.get(ids[0] % 5, f" w{ids[0]}" if ids[0] % 7 else " <b>&")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    browser = find_browser()
    if browser is None:
        pytest.skip(
            "no headless browser found (looked for chromium, chromium-browser, google-chrome); "
            "install Debian's chromium (`apt-get install -y chromium`, done by scripts/test.sh)"
        )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("html")
    shard = sidecar_module.EXPLORER_SHARD
    sidecar_module.EXPLORER_SHARD = 8  # several shards, so the test sees that only one is loaded
    try:
        p = planted(n_tokens=3000)
        diff = diff_features(
            p.cc, p.acts, metadata=p.metadata, tokenizer=NewlineTokenizer(), show_progress=False,
            batch_size=1000, n_top_contexts=5, panels_per_class=3,
        )  # fmt: skip
        paths = write_report(diff, out, quiet=True)
    finally:
        torch.set_num_threads(before)
        sidecar_module.EXPLORER_SHARD = shard
    return browser, paths


def test_page_loads_without_errors_and_the_table_sorts(page):
    browser, paths = page
    url = paths["html"].resolve().as_uri() + "#selftest"
    result = run_browser(browser, "--virtual-time-budget=10000", "--dump-dom", url)
    dom = result.stdout
    assert "<table" in dom, f"no DOM (rc {result.returncode}): {result.stderr[-2000:]}"
    errors = json.loads(html.unescape(re.search(r'data-errors="([^"]*)"', dom).group(1)))
    assert errors == []
    assert "Uncaught" not in result.stderr
    selftest = re.search(r'data-selftest="([^"]*)"', dom)
    assert selftest, "the page's self-test did not run"
    got = json.loads(html.unescape(selftest.group(1)))

    latents = json.loads(paths["json"].read_text())["latents"]
    asc = [r["latent"] for r in sorted(latents, key=lambda r: (r["density"], r["latent"]))]
    desc = [r["latent"] for r in sorted(latents, key=lambda r: (-r["density"], r["latent"]))]
    assert got["initial"] == sorted(r["latent"] for r in latents)
    assert got["densityFirst"] == "ascending" and got["densityAsc"] == asc
    assert got["densitySecond"] == "descending" and got["densityDesc"] == desc
    with_r = [r for r in latents if r["relative_norm"] is not None]
    by_r = [r["latent"] for r in sorted(with_r, key=lambda r: (r["relative_norm"], r["latent"]))]
    assert got["relativeNormAsc"][: len(by_r)] == by_r
    assert got["panels"] == len(json.loads(paths["json"].read_text())["details"])
    assert got["images"] == sum(1 for p in paths.values() if p.suffix == ".png")


def test_screenshot_is_not_blank(page, tmp_path):
    browser, paths = page
    shot = tmp_path / "shot.png"
    result = run_browser(
        browser, "--window-size=1280,1800", "--virtual-time-budget=10000",
        f"--screenshot={shot}", paths["html"].resolve().as_uri(),
    )  # fmt: skip
    assert shot.exists(), f"no screenshot (rc {result.returncode}): {result.stderr[-2000:]}"
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (1800, 1280)
    assert img.std() > 0.1
    drawn = (img.min(-1) < 0.85).mean()
    assert drawn > 0.03, f"only {drawn:.3f} of the screenshot is drawn"
    # the top of the page holds the class cards with their colours (not a blank or error page)
    top = img[:200].reshape(-1, 3)
    assert len({tuple(c) for c in (top[::13] * 255).astype(int)}) > 10


def test_explorer_opens_a_latent_typed_by_id(page):
    browser, paths = page
    explorer = json.loads(paths["explorer"].read_text())
    details = json.loads(paths["json"].read_text())["details"]
    # an arbitrary latent without a static panel, whose examples hold a newline token
    latent = next(
        int(k)
        for k, e in sorted(explorer["latents"].items(), key=lambda kv: -int(kv[0]))
        if k not in details and any(t % 5 == 0 for c in e["top"] for t in c["t"])
    )
    entry = explorer["latents"][str(latent)]
    url = paths["html"].resolve().as_uri() + f"#selftest-open-{latent}"
    result = run_browser(browser, "--virtual-time-budget=10000", "--dump-dom", url)
    dom = result.stdout
    errors = json.loads(html.unescape(re.search(r'data-errors="([^"]*)"', dom).group(1)))
    assert errors == []
    got = json.loads(html.unescape(re.search(r'data-selftest="([^"]*)"', dom).group(1)))
    ex = got["explorer"]
    assert ex["opened"], f"latent {latent} did not open"
    assert ex["top"] == len(entry["top"]) > 0
    assert ex["band"] == sum(len(b) for b in entry["bands"])
    assert ex["histBars"] == len(entry["hist"])
    assert f"latent {latent}" in ex["text"]
    # the first top example's activation is shown with its text
    first = entry["top"][0]
    assert f"{first['a']:.4g}".rstrip("0").rstrip(".") in ex["contextText"][0]
    assert any("\u21b5" in t for t in ex["contextText"])  # newline mark
    assert not any("\n" in t or "\t" in t for t in ex["contextText"])
    heights = ex["contextHeights"]
    assert heights and max(heights) < 1.5 * min(heights), heights  # one line each
    assert ex["shards"] == -(-explorer["n_latents"] // 8) > 1
    assert ex["shardsLoaded"] == 1  # only the opened latent's shard was loaded


HOSTILE = ("<!--", "<script>", "</script>", "]]>", "\u2028", " {{ROWS_JSON}}", "&amp;")


class HostileTokenizer:
    """A code corpus's vocabulary: comment and script markup, CDATA ends, a line separator and a
    template slot of the page itself."""

    name = "hostile-stub"

    def decode(self, ids: list[int]) -> str:
        t = ids[0] % 11
        return HOSTILE[t] if t < len(HOSTILE) else f" w{ids[0]}"


def test_token_text_cannot_break_the_page(tmp_path):
    """Issue 29 (d): a vocabulary with `<!--`, `<script>`, `</script>` and `]]>` left the latent
    table with one row and the explorer unopenable (only `</` was escaped in the data blocks)."""
    browser = find_browser()
    if browser is None:
        pytest.skip("no headless browser found (install Debian's chromium)")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = planted(n_tokens=2000)
        diff = diff_features(
            p.cc, p.acts, metadata=p.metadata, tokenizer=HostileTokenizer(), show_progress=False,
            batch_size=1000, n_top_contexts=5, panels_per_class=3,
        )  # fmt: skip
        paths = write_report(diff, tmp_path, quiet=True)
    finally:
        torch.set_num_threads(before)
    explorer = json.loads(paths["explorer"].read_text())
    n_rows = len(json.loads(paths["json"].read_text())["latents"])
    # a latent whose top examples hold every hostile token's neighbourhood: the most varied one
    latent = max(
        explorer["latents"],
        key=lambda k: len({t % 11 for c in explorer["latents"][k]["top"] for t in c["t"]} & set(
            range(len(HOSTILE)))),
    )  # fmt: skip
    shown = {t % 11 for c in explorer["latents"][latent]["top"] for t in c["t"]}
    assert {0, 1, 2, 3} <= shown, "the planted data should put the markup tokens in the examples"
    url = paths["html"].resolve().as_uri() + f"#selftest-open-{latent}"
    result = run_browser(browser, "--virtual-time-budget=10000", "--dump-dom", url)
    dom = result.stdout
    errors = re.search(r'data-errors="([^"]*)"', dom)
    assert errors and json.loads(html.unescape(errors.group(1))) == []
    selftest = re.search(r'data-selftest="([^"]*)"', dom)
    assert selftest, "the page's script did not run to its end"
    got = json.loads(html.unescape(selftest.group(1)))
    assert len(got["initial"]) == n_rows > 30  # every row of the table
    ex = got["explorer"]
    assert ex["opened"] and ex["top"] == len(explorer["latents"][latent]["top"])
    text = "".join(ex["contextText"])
    for token in ("<!--", "<script>", "</script>", "]]>", "&amp;", "{{ROWS_JSON}}"):
        assert token in text, f"{token!r} is not shown as text"
    # the static panels show the tokens as text too, and no slot of the template was filled twice
    assert dom.count("&lt;!--") >= 1 and "{{ROWS_JSON}}" in dom
    assert dom.count('id="latent-rows"') == 1


PAPER_D_SAE = 24_576


def test_paper_sized_report_is_small_and_opens_a_latent_from_its_sidecar(page, tmp_path):
    """Issue 27: at the paper's 24,576 latents (the fixture's report, its rows and explorer entries
    repeated under new ids, every latent explored) report.html stays under 5 MB with its figures;
    the table's rows come from report_files/rows.js and a latent from its explorer shard."""
    browser, paths = page
    data = json.loads(paths["json"].read_text())
    small = json.loads(paths["explorer"].read_text())
    rows, entries = data["latents"], list(small["latents"].values())
    data["latents"] = [dict(rows[j % len(rows)], latent=j) for j in range(PAPER_D_SAE)]
    explorer = dict(small, n_latents=PAPER_D_SAE)
    explorer["latents"] = {str(j): entries[j % len(entries)] for j in range(PAPER_D_SAE)}
    figures = {name: p for name, p in paths.items() if p.suffix == ".png"}
    out = write_html(tmp_path, data, figures, explorer)
    size = out["html"].stat().st_size
    assert size < 5e6, f"report.html is {size / 1e6:.1f} MB at {PAPER_D_SAE} latents"
    assert (out["sidecar"] / "rows.js").exists()
    n_shards = -(-PAPER_D_SAE // sidecar_module.EXPLORER_SHARD)
    assert len(list(out["sidecar"].glob("explorer-*.js"))) == n_shards
    latent = PAPER_D_SAE - 3  # in the last shard
    url = out["html"].resolve().as_uri() + f"#selftest-open-{latent}"
    result = run_browser(browser, "--virtual-time-budget=20000", "--dump-dom", url)
    dom = result.stdout
    errors = re.search(r'data-errors="([^"]*)"', dom)
    assert errors, f"no DOM (rc {result.returncode}): {result.stderr[-2000:]}"
    assert json.loads(html.unescape(errors.group(1))) == []
    got = json.loads(html.unescape(re.search(r'data-selftest="([^"]*)"', dom).group(1)))
    assert got["initial"] == list(range(1000))  # the first 1,000 rows, from rows.js
    assert f"1000 shown, {PAPER_D_SAE} matching" in dom
    ex = got["explorer"]
    entry = explorer["latents"][str(latent)]
    assert ex["opened"] and ex["shardsLoaded"] == 1 and ex["shards"] == n_shards
    assert ex["top"] == len(entry["top"]) and ex["histBars"] == len(entry["hist"])
    assert f"latent {latent}" in ex["text"]

    # without its sidecar folder the page says what is missing instead of failing silently
    shutil.rmtree(out["sidecar"])
    result = run_browser(browser, "--virtual-time-budget=10000", "--dump-dom", url)
    errors = json.loads(html.unescape(re.search(r'data-errors="([^"]*)"', result.stdout).group(1)))
    assert any("report_files/rows.js" in e for e in errors), errors
    assert "keep the report_files folder next to this page" in result.stdout
