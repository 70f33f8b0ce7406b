"""write_report: valid non-blank PNGs, a complete report.json, and report.md numbers that all come
from report.json."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from test_analysis_planted import planted

from crossdiff.analysis import diff_features
from crossdiff.report import write_report

pytestmark = pytest.mark.usefixtures("one_thread")

NUMBER = re.compile(r"(?<![A-Za-z_\d.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


class StubTokenizer:
    name = "stub"

    def decode(self, ids: list[int]) -> str:
        return f" w{ids[0]}" if ids[0] % 7 else " <b>&"  # something to escape in HTML


def build_report(out_dir: Path):
    p = planted(n_tokens=3000)
    diff = diff_features(
        p.cc, p.acts, metadata=p.metadata, tokenizer=StubTokenizer(), show_progress=False,
        batch_size=1000, n_top_contexts=5, panels_per_class=3,
    )  # fmt: skip
    return diff, write_report(diff, out_dir, quiet=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    diff, paths = build_report(out)
    return diff, paths, out


def json_numbers(obj) -> list[float]:
    """Every number in report.json, including numbers written inside its strings (sentences)."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in json_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in json_numbers(v)]
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, str):
        return [float(m) for m in NUMBER.findall(obj)]
    return []


def significant_digits(text: str) -> int:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return max(1, len(mantissa))


def unmatched_numbers(md: str, data: dict) -> list[str]:
    """Numbers in report.md that no number of report.json rounds to (at the shown precision)."""
    candidates = json_numbers(data)
    missing = []
    for text in NUMBER.findall(md):
        shown = float(text)
        digits = significant_digits(text)
        if not any(
            math.isclose(float(f"{x:.{digits}g}"), shown, rel_tol=1e-12, abs_tol=1e-300)
            for x in candidates
        ):
            missing.append(text)
    return missing


def test_every_figure_is_a_valid_non_blank_png(report):
    _, paths, _ = report
    figures = {k: v for k, v in paths.items() if v.suffix == ".png"}
    assert set(figures) == {"relative_norm", "density", "decoder_cosine", "domain_shares",
                            "expert_entropy", "fve", "latent_scaling"}  # fmt: skip
    for name, path in figures.items():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(path)[..., :3]
        assert img.shape[0] > 200 and img.shape[1] > 300, name
        assert img.std() > 0.05, f"{name} is (nearly) blank"
        non_white = (img.min(-1) < 0.9).mean()
        assert 0.01 < non_white < 0.9, f"{name}: {non_white:.3f} of pixels drawn"
        colours = {tuple(c) for c in (img.reshape(-1, 3)[::97] * 255).astype(int)}
        assert len(colours) > 5, f"{name} has only {len(colours)} colours"


def test_report_json_is_complete_and_strict(report):
    diff, paths, _ = report
    data = json.loads(
        paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")
    )
    assert data["summary"]["class_counts"] == diff.summary["class_counts"]
    assert len(data["latents"]) == len(diff.table)
    assert data["columns"] == list(diff.table.columns)
    assert data["versions"]["torch"] == torch.__version__.split("+")[0] or data["versions"]["torch"]
    assert data["config"]["split"] == {"name": "paper", "lo": 0.3, "hi": 0.7}
    assert set(data["details"]) == {str(k) for k in diff.details}
    row = data["latents"][5]
    assert row["density"] == pytest.approx(float(diff.table.loc[5, "density"]))
    dead = [r for r in data["latents"] if r["class"] == "dead"]
    assert dead and all(r["mean_activation"] is None for r in dead)  # NaN becomes null
    assert set(data["figures"]) == {k for k, v in paths.items() if v.suffix == ".png"}


def test_every_number_in_markdown_is_in_json(report):
    _, paths, _ = report
    md = paths["md"].read_text()
    data = json.loads(paths["json"].read_text())
    numbers = NUMBER.findall(md)
    assert len(numbers) > 60  # the check is not vacuous
    assert unmatched_numbers(md, data) == []
    # and the check can fail: a number that is not in report.json is caught
    fve = f"{data['summary']['reconstruction']['fve']:.4g}"
    assert fve in md
    assert unmatched_numbers(md.replace(fve, "0.5123"), data) == ["0.5123"]


def test_markdown_tables_equal_json_values(report):
    _, paths, _ = report
    md = paths["md"].read_text()
    s = json.loads(paths["json"].read_text())["summary"]
    for cls, count in s["class_counts"].items():
        assert re.search(rf"^\| {re.escape(cls)} \| {count} \|", md, re.M), cls
    for model, fve in s["reconstruction"]["fve_per_model"].items():
        assert re.search(rf"^\| {model} \| {fve:.4g} \|", md, re.M), model
    assert f"lo = {s['split']['lo']:.4g}, hi = {s['split']['hi']:.4g}" in md
    for claim in s["claims"]:
        assert claim["sentence"] in md
        assert f"| {claim['verdict']} |" in md
        assert claim["excluding_artifacts"]["sentence"] in md


def test_html_is_self_contained(report):
    _, paths, _ = report
    page = paths["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    n_png = sum(1 for p in paths.values() if p.suffix == ".png")
    assert page.count('src="data:image/png;base64,') == n_png
    assert "&lt;b&gt;&amp;" in page  # token text is escaped, not injected


def test_writes_are_atomic_and_rerun_replaces(report, tmp_path):
    _, paths, out = report
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    before = paths["json"].read_text()
    diff, again = build_report(out)
    assert again["json"].read_text() == before  # deterministic
    assert all(p.stat().st_mode & 0o044 for p in again.values())  # readable by others
    assert np.isfinite(diff.table["density"]).all()
