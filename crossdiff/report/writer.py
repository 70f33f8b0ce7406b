"""write_report: report.json (everything), report.md, report.html and the PNG figures."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from crossdiff.analysis.diff import FeatureDiff
from crossdiff.analysis.explorer import DEFAULT_PER_CLASS, explore
from crossdiff.plumbing.common import (
    CrossdiffError,
    atomic_path,
    check_output_dir,
    write_json_atomic,
)
from crossdiff.report.figures import FIGURES, make_figures
from crossdiff.report.fileset import report_set
from crossdiff.report.html import render_report_html
from crossdiff.report.markdown import render_markdown
from crossdiff.report.sidecar import write_sidecar

_PACKAGES = ("crossdiff", "torch", "transformer-lens", "sae-lens", "numpy", "pandas", "scipy",
             "matplotlib")  # fmt: skip


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def to_jsonable(obj: Any) -> Any:
    """numpy/pandas scalars to Python, NaN/inf to None, tuples to lists, keys to str."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def report_data(diff: FeatureDiff, figures: dict[str, Path] | None = None) -> dict[str, Any]:
    """Everything in report.json: versions, run config, summary, per-latent table and panels."""
    return to_jsonable(
        {
            "format": "crossdiff-report",
            "format_version": 1,
            "versions": package_versions(),
            "config": diff.config,
            "summary": diff.summary,
            "columns": list(diff.table.columns),
            "latents": diff.table.to_dict(orient="records"),
            "details": {str(k): v for k, v in diff.details.items()},
            "figures": {
                name: {"file": path.name, "title": FIGURES[name][0]}
                for name, path in (figures or {}).items()
            },
        }
    )


def write_html(
    out_dir: Path,
    data: dict[str, Any],
    figures: dict[str, Path],
    explorer: dict[str, Any] | None,
    *,
    sidecar_dir: Path | None = None,
) -> dict[str, Path]:
    """report.html (in `out_dir`) and its report_files/ folder (in `sidecar_dir`, default
    `out_dir`: write_report stages report.html and writes the folder where the page will be)
    from report.json's data and explorer.json's; {'html': ..., 'sidecar': ...} ('sidecar' only
    when the page has sidecar files)."""
    page, sidecar = render_report_html(data, figures, explorer)
    # the sidecar first: report.html never names a shard that is not there
    folder = write_sidecar(out_dir if sidecar_dir is None else sidecar_dir, sidecar)
    with atomic_path(out_dir / "report.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    paths = {"html": out_dir / "report.html"}
    if folder is not None:
        paths["sidecar"] = folder
    return paths


def write_report(
    diff: FeatureDiff,
    out_dir: str | Path,
    *,
    quiet: bool = False,
    models: dict[str, Any] | str | Path | None = None,
    explorer_per_class: int = DEFAULT_PER_CLASS,
) -> dict[str, Path]:
    """Write report.json, report.md, report.html with its report_files/ folder, explorer.json and
    PNG figures.

    Returns name -> path for every file written ('json', 'md', 'html', 'explorer', 'sidecar' (the
    report_files folder, when there is one) and one per figure). report.html holds the figures
    and the summary; report_files/ holds the explorer's examples in shards the page loads when a
    latent is opened, and the latent table's rows when they are large (crossdiff.report.sidecar
    gives the format); keep it next to report.html. explorer.json holds each live latent's
    top and activation-band examples, activation histogram and, with `models` (loaded models by
    name, or a folder with one model folder per model name), logit effects; the
    `explorer_per_class` latents of each class with the largest activation mass get one. A diff
    loaded from JSON (no crosscoder or tokens) gets no explorer. The files replace the folder's
    report as one set (report/fileset.py), so an interrupted run leaves the old report or the
    new one, never a mix or a half-written file.
    """
    if not isinstance(diff, FeatureDiff):
        raise CrossdiffError(
            f"write_report: diff must be a FeatureDiff (what diff_features returns), got "
            f"{'None' if diff is None else type(diff).__name__}"
        )
    out_dir = check_output_dir(out_dir, "write_report: out_dir")
    # every file goes to a staging folder first and replaces the old set as one (fileset.py)
    with report_set(out_dir, quiet=quiet) as stage:
        figures = make_figures(diff.table, diff.summary, stage)
        explorer = None
        if diff.crosscoder is not None and diff.source is not None:
            explorer = to_jsonable(explore(diff, per_class=explorer_per_class, models=models))
        data = report_data(diff, figures)
        if explorer is not None:
            data["explorer"] = {
                "file": "explorer.json",
                "n_latents": explorer["n_latents"],
                "logit_models": explorer["logit_models"],
            }
        write_json_atomic(stage / "report.json", data)
        if explorer is not None:  # compact: it holds every explored latent's contexts
            with atomic_path(stage / "explorer.json") as tmp:
                tmp.write_text(json.dumps(explorer, separators=(",", ":")), encoding="utf-8")
        with atomic_path(stage / "report.md") as tmp:
            tmp.write_text(render_markdown(data))
        html_paths = write_html(stage, data, figures, explorer, sidecar_dir=out_dir)
    paths: dict[str, Path] = {"json": out_dir / "report.json"}
    if explorer is not None:
        paths["explorer"] = out_dir / "explorer.json"
    paths["md"] = out_dir / "report.md"
    paths["html"] = out_dir / "report.html"
    if "sidecar" in html_paths:
        paths["sidecar"] = html_paths["sidecar"]
    paths.update({name: out_dir / path.name for name, path in figures.items()})
    if not quiet:
        print(f"wrote report ({len(figures)} figures) to {out_dir}:")
        for name, path in paths.items():
            print(f"  {name:16s} {path}")
    return paths
