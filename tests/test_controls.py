"""compare_with_controls on TRAINED crosscoders: four planted "models" (A, A', B, B') hold the
same features in different random bases. With nothing else, no claim holds beyond the controls;
when A and A' hold features that B and B' lack, claim 1 does."""

from __future__ import annotations

import json

import pytest
from planted_controls import SHARED_ONLY, planted_models, three_pairs

from crossdiff.analysis.controls import CANNOT_TELL, HOLDS, compare_with_controls
from crossdiff.common import CrossdiffError

EXTRA_IN_A = {**SHARED_ONLY, "dense_extra": (10, (0.02, 0.08), ("a", "a2"))}


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py


@pytest.fixture(scope="module")
def null_run():
    return three_pairs(planted_models(seed=0), seeds=(0, 1))


@pytest.fixture(scope="module")
def extra_run():
    return three_pairs(planted_models(EXTRA_IN_A, seed=1), seeds=(0, 1))


@pytest.mark.slow  # pays for null_run (about 17 s on the loaded machine)
def test_same_features_in_different_bases_hold_no_claim_beyond_controls(null_run):
    out = compare_with_controls(*null_run)
    assert [c["key"] for c in out["claims"]] == [
        "b_fewer_unique", "b_denser_than_shared", "a_sparser_than_shared",
    ]  # fmt: skip
    assert all(c["verdict"] != HOLDS for c in out["claims"]), out["sentences"]
    count = out["claims"][0]
    assert count["ci"] is not None and count["ci"][0] <= 0 <= count["ci"][1]
    assert all(c["sentence"].startswith("Beyond controls") for c in out["claims"])


@pytest.mark.slow  # pays for extra_run (about 16 s on the loaded machine)
def test_features_b_lacks_show_as_an_excess_beyond_controls(extra_run):
    main, ctrl_a, _ = extra_run
    # the planted difference is visible: about ten dense-only latents, none in the controls
    assert all(d.summary["class_counts"]["dense-only"] >= 7 for d in main)
    assert all(d.summary["class_counts"]["dense-only"] <= 2 for d in ctrl_a)
    out = compare_with_controls(*extra_run)
    claim = out["claims"][0]
    assert claim["verdict"] == HOLDS, claim["sentence"]
    excess_a, excess_b = claim["components"]["excess_dense"], claim["components"]["excess_moe"]
    assert excess_a["ci"][0] > 0
    assert excess_b["ci"][0] <= 0 <= excess_b["ci"][1]
    assert claim["effect"] == pytest.approx(excess_a["value"] - excess_b["value"])


@pytest.mark.slow  # shares extra_run
def test_pairs_report_each_diffs_own_figures_and_the_output_is_json(extra_run):
    out = compare_with_controls(*extra_run)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out
    for role, diffs in zip(("main", "control_a", "control_b"), extra_run, strict=True):
        pair = out["pairs"][role]
        assert pair["n_seeds"] == len(diffs)
        for side in ("A", "B"):
            cls = f"{pair[side]}-only"
            counts = [d.summary["class_counts"][cls] for d in diffs]
            assert pair["exclusive"][cls]["values"] == counts
        fves = [d.summary["reconstruction"]["fve"] for d in diffs]
        assert pair["fve"]["values"] == fves
        assert pair["fve"]["mean"] == pytest.approx(sum(fves) / len(fves))
    assert out["roles"] == {"main": ["dense", "moe"], "control_a": ["dense", "dense2"],
                            "control_b": ["moe", "moe2"]}  # fmt: skip


@pytest.mark.slow  # shares extra_run
def test_one_seed_gives_a_count_interval_but_cannot_tell(extra_run):
    main, ctrl_a, ctrl_b = extra_run
    out = compare_with_controls(main[:1], ctrl_a[:1], ctrl_b[:1])
    claim = out["claims"][0]
    assert claim["verdict"] == CANNOT_TELL and "seed" in claim["reason"]
    lo, hi = claim["ci"]  # Poisson interval around the one seed's counts
    assert lo < claim["effect"] < hi


@pytest.mark.slow  # shares extra_run
def test_inputs_that_do_not_fit_are_refused(extra_run):
    main, ctrl_a, ctrl_b = extra_run
    with pytest.raises(CrossdiffError, match="control_a"):
        compare_with_controls(main, ctrl_b, ctrl_a)
    with pytest.raises(CrossdiffError, match="non-empty"):
        compare_with_controls([], ctrl_a, ctrl_b)
    with pytest.raises(CrossdiffError, match="different directions"):
        compare_with_controls([main[0], ctrl_a[0]], ctrl_a, ctrl_b)
