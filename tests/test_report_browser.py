"""report.html in a real headless browser (Debian's chromium): no console errors, the latent table
sorts on real click events, a latent typed into the explorer's search box opens with its
examples (newlines shown as marks, one line per example, only its chunk parsed), and a screenshot
is not blank."""

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

import crossdiff.report.html as html_module
from crossdiff.analysis import diff_features
from crossdiff.report import write_report

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
    chunk = html_module.EXPLORER_CHUNK
    html_module.EXPLORER_CHUNK = 8  # several chunks, so the test sees that only one is parsed
    try:
        p = planted(n_tokens=3000)
        diff = diff_features(
            p.cc, p.acts, metadata=p.metadata, tokenizer=NewlineTokenizer(), show_progress=False,
            batch_size=1000, n_top_contexts=5, panels_per_class=3,
        )  # fmt: skip
        paths = write_report(diff, out, quiet=True)
    finally:
        torch.set_num_threads(before)
        html_module.EXPLORER_CHUNK = chunk
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
    assert ex["chunks"] == -(-explorer["n_latents"] // 8) > 1
    assert ex["chunksParsed"] == 1  # only the opened latent's chunk was parsed
