"""The latent-scaling scatter is drawn only when some model-specific latent has both ratios: an
empty plot with an empty legend would read as "no artifacts" when nothing was measured."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import pandas as pd

from crossdiff.analysis.classes import DEAD, DESIGNATED, SHARED
from crossdiff.report.figures import latent_scaling_scatter

CLASSES = [DESIGNATED, SHARED, "dense-only", "moe-only", DEAD]


def _inputs(nu_rec: list[float]):
    table = pd.DataFrame(
        {
            "class": ["dense-only", "dense-only", "moe-only", SHARED],
            "nu_err": [0.1, 0.9, 0.2, 1.0],
            "nu_rec": nu_rec,
            "scaling_artifact": [False, True, False, False],
        }
    )
    summary = {
        "classes": CLASSES,
        "latent_scaling": {
            "computed": True,
            "columns": ["nu_err", "nu_rec"],
            "tolerance": {"dense-only": 0.5, "moe-only": 0.5},
        },
    }
    return table, summary


def test_no_figure_when_no_exclusive_latent_has_both_ratios(tmp_path):
    table, summary = _inputs([math.nan, math.nan, math.nan, 1.0])
    assert latent_scaling_scatter(table, summary, tmp_path / "ls.png") is None
    assert not (tmp_path / "ls.png").exists()


def test_figure_drawn_from_the_exclusive_latents(tmp_path):
    table, summary = _inputs([0.05, 0.8, math.nan, 1.0])
    path = latent_scaling_scatter(table, summary, tmp_path / "ls.png")
    assert path == tmp_path / "ls.png"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.std() > 0.01  # a drawn plot, not a blank canvas
