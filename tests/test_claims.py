"""The claims' statistics (Cliff's delta, its bootstrap CI, Holm, the binomial count claim, the
minimum n), domain lift, and the L0 warning, on hand examples and on trained crosscoders."""

from __future__ import annotations

import html
import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, norm
from test_analysis_planted import CODE_ONLY, planted

from crossdiff.analysis import diff_features
from crossdiff.analysis.claims import DOES_NOT_HOLD, HOLDS, TOO_FEW, evaluate_claims
from crossdiff.analysis.stats import bootstrap_cliffs_delta, cliffs_delta, holm
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
from crossdiff.crosscoder.synthetic import planted_crosscoder_data
from crossdiff.report.commands import format_summary
from crossdiff.report.html import render_html
from crossdiff.report.markdown import render_markdown
from crossdiff.report.writer import report_data
from crossdiff.run.pipeline import _summary_lines

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cliffs_delta_by_hand_and_as_rank_biserial():
    x, y = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 4.0])
    # pairs: 1 < 2, 2, 4 (-3); 2 = 2, 2 and < 4 (-1); 3 > 2, 2 and < 4 (+1): (0 + 2 - 5) / 9
    assert cliffs_delta(x, y) == pytest.approx(-1 / 3)
    assert cliffs_delta(y, x) == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 20, 37).astype(float), rng.integers(3, 25, 51).astype(float)
    u = mannwhitneyu(a, b).statistic
    assert cliffs_delta(a, b) == pytest.approx(2 * u / (37 * 51) - 1)  # rank-biserial
    brute = np.sign(a[:, None] - b[None, :]).mean()
    assert cliffs_delta(a, b) == pytest.approx(brute)


def test_holm_against_a_hand_example():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # untested claims stay None and do not count in the family (m = 2)
    assert holm([0.02, None, 0.04]) == [pytest.approx(0.04), None, pytest.approx(0.04)]
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_bootstrap_ci_covers_the_true_effect_and_excludes_zero_for_a_strong_one():
    # X ~ N(mu, 1), Y ~ N(0, 1): delta = P(X > Y) - P(X < Y) = 2 Phi(mu / sqrt 2) - 1
    def true_delta(mu):
        return 2 * norm.cdf(mu / math.sqrt(2)) - 1

    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(100):
        x, y = rng.normal(0.5, 1, 60), rng.normal(0, 1, 80)
        lo, hi = bootstrap_cliffs_delta(x, y, n_resamples=600, seed=int(rng.integers(1 << 30)))
        covered += lo <= true_delta(0.5) <= hi
    assert 88 <= covered <= 99  # a 95% interval: about 95 of 100
    x, y = rng.normal(1.5, 1, 30), rng.normal(0, 1, 30)
    lo, hi = bootstrap_cliffs_delta(x, y)
    assert 0 < lo <= true_delta(1.5) <= hi
    assert bootstrap_cliffs_delta(x, y) == (lo, hi)  # fixed seed: reproducible
    # the binned resampling equals a brute-force bootstrap of the pairs, tiny case
    a, b = np.array([1.0, 2.0, 2.0, 3.0]), np.array([0.0, 2.0, 2.0, 5.0, 3.0, 1.0])
    brute = [cliffs_delta(a[rng.integers(0, 4, 4)], b[rng.integers(0, 6, 6)]) for _ in range(4000)]
    ours = bootstrap_cliffs_delta(a, b, n_resamples=4000, level=0.8)
    assert ours == pytest.approx(tuple(np.quantile(brute, [0.1, 0.9])), abs=0.05)


def labels_and_density(n_a: int, n_b: int, n_shared: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = ["dense-only"] * n_a + ["moe-only"] * n_b + ["shared"] * n_shared
    density = np.concatenate([
        rng.uniform(0.001, 0.01, n_a), rng.uniform(0.1, 0.2, n_b), rng.uniform(0.02, 0.05, n_shared)
    ])  # fmt: skip
    return density, np.array(labels, dtype=object)


def test_three_latents_are_too_few_to_test():
    density, labels = labels_and_density(n_a=30, n_b=3, n_shared=30)
    claims, method = evaluate_claims(density, labels, "dense", "moe", None)
    by_key = {c["key"]: c for c in claims}
    denser = by_key["b_denser_than_shared"]
    assert method["min_n"] == 10
    assert denser["verdict"] == TOO_FEW and denser["n"] == {"moe-only": 3, "shared": 30}
    assert denser["p_value"] is None and denser["p_holm"] is None and denser["ci"] is None
    assert denser["effect"] == 1.0  # reported, but not as a finding
    assert "too few latents to test" in denser["sentence"] and "holds" not in denser["sentence"]
    sparser = by_key["a_sparser_than_shared"]
    assert sparser["verdict"] == HOLDS
    # Holm over the two tested claims only (claim 1: 3 of 33 exclusive latents)
    p1, p3 = by_key["b_fewer_unique"]["p_value"], sparser["p_value"]
    assert sparser["p_holm"] == pytest.approx(max(2 * min(p1, p3), p3))
    assert "not independent samples" in sparser["sentence"]
    assert all(c["excluding_artifacts"] is None for c in claims)


def test_claim_one_is_an_exact_binomial_test_on_counts():
    density, labels = labels_and_density(n_a=25, n_b=5, n_shared=12)
    claims, _ = evaluate_claims(density, labels, "dense", "moe", None)
    fewer = claims[0]
    assert fewer["key"] == "b_fewer_unique" and fewer["n"] == {"moe-only": 5, "dense-only": 25}
    assert fewer["effect"] == pytest.approx(5 / 30)
    by_hand = sum(math.comb(30, i) for i in range(6)) / 2**30  # P(X <= 5), X ~ Bin(30, 1/2)
    assert fewer["p_value"] == pytest.approx(by_hand, rel=1e-9)
    assert fewer["ci"][0] <= 5 / 30 <= fewer["ci"][1] < 0.5
    assert fewer["verdict"] == HOLDS
    density, labels = labels_and_density(n_a=5, n_b=25, n_shared=12)
    reversed_claims, _ = evaluate_claims(density, labels, "dense", "moe", None)
    assert reversed_claims[0]["verdict"] == DOES_NOT_HOLD
    assert reversed_claims[0]["p_value"] > 0.99
    # nine exclusive latents in all: below the minimum of 10
    few, _ = evaluate_claims(*labels_and_density(n_a=6, n_b=3, n_shared=12), "dense", "moe", None)
    assert few[0]["verdict"] == TOO_FEW


def test_artifacts_are_excluded_in_a_second_family():
    density, labels = labels_and_density(n_a=12, n_b=12, n_shared=20)
    artifact = np.zeros(len(labels), dtype=bool)
    artifact[12:15] = True  # three moe-only latents flagged
    claims, method = evaluate_claims(density, labels, "dense", "moe", artifact)
    ex = claims[1]["excluding_artifacts"]
    assert method["artifacts_excluded"]
    assert ex["n"] == {"moe-only": 9, "shared": 20} and ex["verdict"] == TOO_FEW
    assert ex["n_excluded"] == {"dense-only": 0, "moe-only": 3}
    assert claims[1]["verdict"] == HOLDS and claims[1]["n"]["moe-only"] == 12
    assert ex["sentence"].startswith("Without the 3 latent-scaling artifact(s): ")


@pytest.fixture(scope="module")
def trained():
    """A crosscoder trained on planted pairs: 15 shared (density 0.03), 30 dense-only (0.01),
    10 moe-only (0.1) latents, so all three of the paper's claims are true by construction."""
    acts, _ = planted_crosscoder_data(
        8000, 48, 15, 30, 10, densities={"shared": 0.03, "a_only": 0.01, "b_only": 0.1}, seed=0
    )
    cfg = CrossCoderConfig(d_model=48, d_sae=80, k=2)
    cc = train_crosscoder(acts, cfg, steps=600, batch_size=192, lr=3e-3, log_every=10**9)
    return cc, acts


def test_claims_on_a_trained_crosscoder_over_planted_data(trained):
    cc, acts = trained
    diff = diff_features(cc, acts, model_names=("dense", "moe"), show_progress=False)
    claims = {c["key"]: c for c in diff.summary["claims"]}
    counts = diff.summary["class_counts"]
    assert counts["moe-only"] >= 10 and counts["dense-only"] >= 25 and counts["shared"] >= 10
    for key in ("b_fewer_unique", "b_denser_than_shared", "a_sparser_than_shared"):
        assert claims[key]["verdict"] == HOLDS, claims[key]["sentence"]
        assert claims[key]["excluding_artifacts"]["verdict"] == HOLDS
    assert claims["b_denser_than_shared"]["effect"] > 0.9
    assert claims["b_denser_than_shared"]["ci"][0] > 0.5
    assert claims["a_sparser_than_shared"]["effect"] < -0.5
    assert claims["a_sparser_than_shared"]["ci"][1] < -0.2
    assert claims["b_fewer_unique"]["effect"] == pytest.approx(
        counts["moe-only"] / (counts["moe-only"] + counts["dense-only"])
    )
    holm_p = [c["p_holm"] for c in diff.summary["claims"]]
    assert holm_p == pytest.approx(holm([c["p_value"] for c in diff.summary["claims"]]))
    assert diff.summary["sentences"][:3] == [c["sentence"] for c in diff.summary["claims"]]


def test_l0_warning_only_when_the_threshold_l0_is_far_from_k(trained):
    cc, acts = trained
    diff = diff_features(cc, acts, model_names=("dense", "moe"), show_progress=False)
    rec = diff.summary["reconstruction"]
    assert rec["k"] == 2 and rec["l0_topk"] == pytest.approx(2.0)
    assert 1.0 < rec["l0"] < 4.0 and diff.summary["warnings"] == []
    # the top-k FVE equals a direct computation over the same batches
    with torch.no_grad():
        x_hat = torch.cat([cc.decode(cc.encode_topk(b)) for b in acts.split(1024)])
    x = acts.double()
    for m, name in enumerate(("dense", "moe")):
        sse = ((x[:, m] - x_hat[:, m].double()) ** 2).sum()
        sst = ((x[:, m] - x[:, m].mean(0)) ** 2).sum()
        assert rec["fve_topk_per_model"][name] == pytest.approx(float(1 - sse / sst), rel=1e-5)
    saved = cc.threshold.clone()
    try:
        with torch.no_grad():
            cc.threshold.mul_(0.05)  # a threshold far below the one training settled on
        low = diff_features(cc, acts, model_names=("dense", "moe"), show_progress=False)
    finally:
        with torch.no_grad():
            cc.threshold.copy_(saved)
    assert not cc.hook_sae_acts_pre._forward_hooks  # the pass removed its hook
    rec_low = low.summary["reconstruction"]
    assert rec_low["l0"] > 4 * rec_low["k"]
    assert rec_low["l0_topk"] == pytest.approx(2.0)  # BatchTopK does not use the threshold
    (warning,) = low.summary["warnings"]
    assert f"L0 = {rec_low['l0']:.3g}" in warning and "k = 2" in warning
    assert "denser code" in warning
    # the warning and both FVEs reach every place a reader looks
    data = report_data(low)
    md, page = render_markdown(data), render_html(data, {})
    assert f"**Warning:** {warning}" in md
    assert f"{rec_low['fve_topk']:.4g} with BatchTopK at k = 2" in md
    assert html.escape(warning) in page and "FVE top-k (all)" in page
    assert f"WARNING: {warning}" in _summary_lines(low.summary)
    assert f"warning: {warning}" in format_summary(low.summary)
    assert "WARNING" not in "".join(_summary_lines(diff.summary))
    assert "**Warning:**" not in render_markdown(report_data(diff))


def test_domain_lift_is_one_without_preference_and_above_one_for_a_domain_latent():
    p = planted()
    diff = diff_features(p.cc, p.acts, metadata=p.metadata, show_progress=False, batch_size=2000)
    t = diff.table
    token_share = diff.summary["domains"]["token_share"]
    assert token_share["code"] == pytest.approx(1 / 3)
    # fires only on code: all its mass there, so lift = 1 / (1/3) and 0 elsewhere
    assert t.loc[CODE_ONLY, "lift_code"] == pytest.approx(3.0)
    assert t.loc[CODE_ONLY, "lift_science"] == 0.0
    # planted shared latents fire independently of the domain: lift about 1 in every domain
    uniform = t[(t["class"] == "shared") & (t["latent"] != CODE_ONLY)]
    for d in ("code", "science", "stories"):
        assert uniform[f"lift_{d}"].mean() == pytest.approx(1.0, abs=0.05)
        assert uniform[f"lift_{d}"].between(0.7, 1.3).all()
        np.testing.assert_allclose(t[f"lift_{d}"] * token_share[d], t[f"share_{d}"])
    # the planted stand-in has no encode_topk and no k: no top-k numbers, no L0 warning
    assert diff.summary["reconstruction"]["l0_topk"] is None and diff.summary["warnings"] == []
    per_class = diff.summary["domains"]["mean_lift_per_class"]
    shared_lift = t.loc[t["class"] == "shared", "lift_code"].mean()
    assert per_class["shared"]["code"] == pytest.approx(shared_lift)
