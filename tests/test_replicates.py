"""match_latents and replicate_summary on TRAINED crosscoders over planted data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from crossdiff import CrossCoderConfig, diff_features, train_crosscoder
from crossdiff.analysis.replicates import match_latents, replicate_summary
from crossdiff.crosscoder.synthetic import match_planted_latents, planted_crosscoder_data
from crossdiff.plumbing.common import CrossdiffError

N_TRAIN = 6000
SEEDS = (0, 1, 2)


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py


@pytest.fixture(scope="module")
def seeds_run():
    acts, truth = planted_crosscoder_data(9000, 32, 12, 5, 5, densities=(0.02, 0.08), seed=0)
    cfg = CrossCoderConfig(d_model=32, d_sae=64, k=2, shared_decoder="free")
    diffs = []
    for seed in SEEDS:
        cc = train_crosscoder(acts[:N_TRAIN], cfg, steps=600, batch_size=256, lr=3e-3,
                              seed=seed, log_every=10**9)  # fmt: skip
        diffs.append(diff_features(cc, acts[N_TRAIN:], show_progress=False, batch_size=4096,
                                   model_names=("dense", "moe"), latent_scaling=False))  # fmt: skip
    return truth, diffs


@pytest.mark.slow  # pays for seeds_run, two crosscoders (about 19 s on the loaded machine)
def test_a_crosscoder_matches_its_own_permuted_copy_exactly(seeds_run):
    cc = seeds_run[1][0].crosscoder
    other = copy.deepcopy(cc)
    perm = np.random.default_rng(0).permutation(cc.cfg.d_sae)
    with torch.no_grad():
        other.W_dec.copy_(cc.W_dec[torch.from_numpy(perm)])
    match = match_latents(cc, other)
    has_vector = (cc.W_dec.detach().norm(dim=-1) > 0).any(-1).numpy()
    assert has_vector.all()
    # other's latent j is cc's latent perm[j], so cc's latent perm[j] must match j
    assert (match[perm] == np.arange(len(perm))).all()


@pytest.mark.slow  # shares seeds_run
def test_two_seeds_match_most_planted_feature_latents(seeds_run):
    truth, diffs = seeds_run
    cc0, cc1 = diffs[0].crosscoder, diffs[1].crosscoder
    found = [match_planted_latents(cc.W_dec.detach(), cc.decoder_norms().detach(), truth)
             for cc in (cc0, cc1)]  # fmt: skip
    pairs = [(m0["latent"], m1["latent"]) for m0, m1 in
             zip(found[0]["matches"], found[1]["matches"], strict=True)
             if min(m0["cosine"], m1["cosine"]) >= 0.95]  # fmt: skip
    # planted features both seeds recovered cleanly (a small crosscoder also learns near
    # duplicates of some features, which make the rest ambiguous to match)
    assert len(pairs) >= 8
    match = match_latents(cc0, cc1)
    agree = np.mean([match[j0] == j1 for j0, j1 in pairs])
    assert agree >= 0.7
    # matches are one-to-one
    taken = match[match >= 0]
    assert len(taken) == len(set(taken.tolist()))


@pytest.mark.slow  # shares seeds_run
def test_replicate_summary_lays_each_seed_beside_its_own_diff(seeds_run):
    _, diffs = seeds_run
    out = replicate_summary(diffs, list(SEEDS))
    assert out["n_seeds"] == 3 and out["seeds"] == [0, 1, 2]
    for per_seed, diff in zip(out["per_seed"], diffs, strict=True):
        assert per_seed["class_counts"] == diff.summary["class_counts"]
        assert per_seed["fve"] == diff.summary["reconstruction"]["fve"]
        assert per_seed["fve_per_model"] == diff.summary["reconstruction"]["fve_per_model"]
        for claim in diff.summary["claims"]:
            assert per_seed["claims"][claim["key"]]["verdict"] == claim["verdict"]
            assert per_seed["claims"][claim["key"]]["effect"] == claim["effect"]
    counts = [d.summary["class_counts"]["dense-only"] for d in diffs]
    fig = out["figures"]["class_counts"]["dense-only"]
    assert fig["values"] == counts and fig["min"] == min(counts) and fig["max"] == max(counts)
    assert fig["mean"] == pytest.approx(np.mean(counts))
    assert fig["sd"] == pytest.approx(np.std(counts, ddof=1))
    fves = [d.summary["reconstruction"]["fve"] for d in diffs]
    assert out["figures"]["fve"]["sd"] == pytest.approx(np.std(fves, ddof=1))
    # planted exclusives come back with their class in every seed
    stable = out["stability"]["dense-only"]
    assert stable["n"] == counts and stable["fraction"]["mean"] >= 0.6
    assert out["stable_exclusive"]["dense-only"]["values"] == stable["stable"]
    assert out["note"] is None


@pytest.mark.slow  # shares seeds_run
def test_one_seed_has_no_spread_and_says_so(seeds_run):
    out = replicate_summary(seeds_run[1][:1], [7])
    assert out["figures"]["fve"]["sd"] is None and out["stability"] is None
    assert "one seed" in out["note"]


@pytest.mark.slow  # shares seeds_run
def test_bad_seed_lists_are_refused(seeds_run):
    _, diffs = seeds_run
    with pytest.raises(CrossdiffError, match="one seed per diff"):
        replicate_summary(diffs, [0, 1])
    with pytest.raises(CrossdiffError, match="repeat"):
        replicate_summary(diffs[:2], [3, 3])
    with pytest.raises(CrossdiffError, match="min_cosine"):
        match_latents(diffs[0].crosscoder, diffs[1].crosscoder, min_cosine=2.0)
