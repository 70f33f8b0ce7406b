"""The report's "Controls and seeds" section: rendered in report.md, report.html and report.json
when the summary has the `controls` and `replicates` blocks, and absent (the files as without the
feature) when it has not."""

from __future__ import annotations

import copy
import json

import matplotlib.image as mpimg
import pytest
from test_analysis_planted import planted
from test_report_files import unmatched_numbers

from crossdiff.analysis import diff_features
from crossdiff.analysis.controls import compare_with_controls
from crossdiff.analysis.replicates import replicate_summary
from crossdiff.report import write_report
from crossdiff.report.html import render_html
from crossdiff.report.markdown import render_markdown
from crossdiff.report.writer import report_data

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py


def _diff(p, names):
    return diff_features(p.cc, p.acts, metadata=p.metadata, show_progress=False,
                         batch_size=1000, n_top_contexts=3, panels_per_class=2,
                         model_names=names)  # fmt: skip


@pytest.fixture(scope="module")
def with_blocks(tmp_path_factory):
    data = [planted(n_tokens=2000, seed=s) for s in (0, 1)]
    main = [_diff(p, ("dense", "moe")) for p in data]
    ctrl_a = [_diff(p, ("dense", "dense2")) for p in data]
    ctrl_b = [_diff(p, ("moe", "moe2")) for p in data]
    plain = copy.copy(main[0])
    plain.summary = dict(main[0].summary)
    diff = main[0]
    diff.summary["replicates"] = replicate_summary(main, [0, 1])
    diff.summary["controls"] = compare_with_controls(main, ctrl_a, ctrl_b, n_resamples=200)
    out = tmp_path_factory.mktemp("controls")
    return diff, plain, write_report(diff, out, quiet=True)


def test_the_section_is_in_markdown_html_and_json(with_blocks):
    diff, _, paths = with_blocks
    md, page = paths["md"].read_text(), paths["html"].read_text()
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["controls"] == json.loads(json.dumps(diff.summary["controls"]))
    assert data["summary"]["replicates"]["seeds"] == [0, 1]
    assert "## Controls and seeds" in md and 'id="controls">Controls and seeds</h2>' in page
    controls = data["summary"]["controls"]
    for sentence in controls["sentences"]:
        assert f"- {sentence}" in md
        assert sentence.replace("'", "&#x27;") in page
    pair = controls["pairs"]["control_b"]
    values = ", ".join(str(v) for v in pair["exclusive"]["moe-only"]["values"])
    assert f"moe-only: {pair['exclusive']['moe-only']['mean']:.4g}" in md and values in md
    assert "| control (B vs B') | moe vs moe2 | 2 |" in md
    rep = data["summary"]["replicates"]
    assert "| latents: dense-only |" in md and "Stability:" in md
    assert set(rep["stability"]) == {"designated-shared", "shared", "dense-only", "moe-only"}
    assert unmatched_numbers(md, data) == []  # every number shown is in report.json


def test_the_controls_figure_is_drawn(with_blocks):
    _, _, paths = with_blocks
    img = mpimg.imread(paths["controls"])[..., :3]
    assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.05
    assert 'id="fig-controls"' in paths["html"].read_text()


def test_a_report_without_the_blocks_is_unchanged(with_blocks, tmp_path):
    diff, plain, _ = with_blocks
    assert "controls" not in plain.summary
    paths = write_report(plain, tmp_path, quiet=True)
    assert "controls" not in paths
    md = paths["md"].read_text()
    assert "Controls and seeds" not in md
    # the only difference the blocks make to report.md is the section itself
    data = report_data(diff)
    with_md = render_markdown(data)
    start = with_md.index("## Controls and seeds")
    stop = with_md.index("## Reconstruction")
    without = json.loads(json.dumps(data))
    del without["summary"]["controls"], without["summary"]["replicates"]
    assert render_markdown(without) == with_md[:start] + with_md[stop:]
    page = render_html(without, {})
    with_page = render_html(data, {})
    start = with_page.index('\n<h2 id="controls">')
    stop = with_page.index("\n\n<h2>Figures</h2>")
    assert page == with_page[:start] + with_page[stop:]
