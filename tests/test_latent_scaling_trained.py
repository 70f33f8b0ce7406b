"""Latent scaling, same_basis and designated latents on TRAINED BatchTopK crosscoders.

The planted data hide known artifacts (features both models carry, written by one model through
a co-firing partner's direction, so the crosscoder classes them exclusive) next to known true
exclusives; latent scaling must flag the former and not the latter.
"""

from __future__ import annotations

import pytest
import torch

from crossdiff import CrossCoderConfig, diff_features, train_crosscoder
from crossdiff.crosscoder.synthetic import planted_artifact_data, planted_crosscoder_data

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("dense", "moe")


def best_latent(cc, direction: torch.Tensor, model: int) -> tuple[int, float]:
    """The crosscoder latent whose decoder vector in `model` is closest in cosine."""
    dec = cc.W_dec.detach()[:, model]
    cos = dec @ direction / dec.norm(dim=-1).clamp_min(1e-12)
    j = int(cos.argmax())
    return j, float(cos[j])


@pytest.fixture(scope="module")
def artifact_run():
    acts, truth, planted = planted_artifact_data(20000, 48, 8, 6, 6, 4, seed=0)
    cfg = CrossCoderConfig(d_model=48, d_sae=96, k=2, shared_decoder="free")
    cc = train_crosscoder(acts, cfg, steps=800, batch_size=256, lr=3e-3, seed=0, log_every=10**9)
    diff = diff_features(cc, acts, show_progress=False, batch_size=4096)
    return acts, truth, planted, cc, diff


@pytest.mark.slow
def test_latent_scaling_flags_planted_artifacts_not_true_exclusives(artifact_run):
    _, truth, planted, cc, diff = artifact_run
    table = diff.table
    # artifacts the crosscoder classed exclusive to the model that has their own direction
    artifacts = []
    for art, own in zip(planted.artifacts, planted.own, strict=True):
        j, cos = best_latent(cc, truth.directions[art, own], own)
        if cos >= 0.9 and table.loc[j, "class"] == f"{NAMES[own]}-only":
            artifacts.append(j)
    # true exclusives (not partners of an artifact) that the crosscoder recovered as exclusive
    partners = {p for group in planted.partners for p in group}
    exclusives = []
    for i, kind in enumerate(truth.kinds):
        if kind not in ("a_only", "b_only") or i in partners:
            continue
        model = 0 if kind == "a_only" else 1
        j, cos = best_latent(cc, truth.directions[i, model], model)
        if cos >= 0.9 and table.loc[j, "class"] == f"{NAMES[model]}-only":
            exclusives.append(j)
    art_rate = float(table.loc[artifacts, "scaling_artifact"].mean())
    excl_rate = float(table.loc[exclusives, "scaling_artifact"].mean())
    print(f"\nflagged: {art_rate:.3f} of {len(artifacts)} planted artifacts classed exclusive, "
          f"{excl_rate:.3f} of {len(exclusives)} recovered true exclusives")  # fmt: skip
    assert len(artifacts) >= 5 and len(exclusives) >= 10  # the measure is not vacuous
    assert art_rate >= 0.8
    assert excl_rate <= 0.1
    # the artifacts' other model carries their signal at about their own strength
    assert table.loc[artifacts, "scaling_ratio"].median() > 0.7
    assert table.loc[exclusives, "scaling_ratio"].max() < 0.43  # the paper split's tolerance
    ls = diff.summary["latent_scaling"]
    assert ls["form"].startswith("free direction") and ls["computed"]
    assert sum(ls["n_flagged"].values()) == int(table["scaling_artifact"].sum())


@pytest.mark.slow
def test_same_basis_is_explicit_and_gives_minders_form(artifact_run):
    acts, _, _, cc, default = artifact_run
    assert default.config["same_basis"] is False
    assert default.table[["nu_err", "nu_rec"]].isna().all().all()
    explicit = diff_features(cc, acts, show_progress=False, batch_size=4096, same_basis=True)
    assert explicit.config["same_basis"] is True
    assert explicit.summary["decoder_cosine"]["meaningful"] is True
    assert "set by the caller" in explicit.summary["decoder_cosine"]["reason"]
    ls = explicit.summary["latent_scaling"]
    assert ls["form"].startswith("own-direction") and ls["columns"] == ["nu_err", "nu_rec"]
    t = explicit.table
    # BatchTopK: the decoder sees only the MSE gradient, so beta on the error along the latent's
    # own vector is 1 in its own model, whatever the latent: why it is not the default
    own = t[t["class"] == "dense-only"]
    assert len(own) >= 5
    assert (own["beta_err_dense"] - 1.0).abs().median() < 0.05


@pytest.mark.slow
def test_tied_crosscoder_on_unrelated_bases_reports_cosines_not_meaningful():
    acts, _ = planted_crosscoder_data(8000, 16, 8, 4, 4, densities=(0.02, 0.08), seed=1)
    cfg = CrossCoderConfig(d_model=16, d_sae=32, k=1.5, n_shared=8, shared_decoder="tied")
    cc = train_crosscoder(acts, cfg, steps=300, batch_size=256, lr=3e-3, seed=0, log_every=10**9)
    diff = diff_features(cc, acts, show_progress=False, batch_size=4096)
    assert diff.config["same_basis"] is False
    cosine = diff.summary["decoder_cosine"]
    assert cosine["meaningful"] is False and "tied" in cosine["reason"]
    labels = diff.table["class"].to_numpy()
    assert set(labels[:8]) <= {"designated-shared", "dead"}  # tied: their own class
    designated = diff.summary["designated"]
    assert designated["shared_decoder"] == "tied" and designated["n"] == 8
    assert designated["designated-shared"] + designated["dead"] == 8


@pytest.mark.slow
def test_free_designated_latent_that_absorbs_a_b_only_feature_is_classed_b_only():
    # 28 of 32 latents are designated (and cheaper): dense B-only features must land on them
    acts, truth = planted_crosscoder_data(
        10000, 24, 8, 4, 8, densities={"shared": 0.03, "a_only": 0.03, "b_only": 0.12}, seed=2
    )
    cfg = CrossCoderConfig(
        d_model=24, d_sae=32, k=2, n_shared=28, shared_decoder="free", shared_penalty_ratio=0.5
    )
    cc = train_crosscoder(acts, cfg, steps=600, batch_size=256, lr=3e-3, seed=0, log_every=10**9)
    diff = diff_features(cc, acts, show_progress=False, batch_size=4096)
    labels = diff.table["class"].to_numpy()
    absorbed = []
    for i, kind in enumerate(truth.kinds):
        if kind == "b_only":
            j, cos = best_latent(cc, truth.directions[i, 1], 1)
            if cos >= 0.9 and j < 28:
                absorbed.append(j)
    print(f"\nB-only features on designated latents: {absorbed}, classes {labels[absorbed]}")
    assert len(absorbed) >= 3
    assert set(labels[absorbed]) == {"moe-only"}
    designated = diff.summary["designated"]
    assert designated["shared_decoder"] == "free" and designated["n"] == 28
    assert "designated-shared" not in designated
    assert designated["moe-only"] >= len(absorbed)
    assert sum(v for k, v in designated.items() if k not in ("n", "shared_decoder")) == 28
    assert diff.summary["class_counts"]["designated-shared"] == 0
