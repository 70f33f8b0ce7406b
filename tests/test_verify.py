"""Screen-and-verify on two tiny models: model B is model A with a planted causal feature (a
direction u written on four trigger tokens and read by the unembedding as token 9). A crosscoder
trained on their layer-0 residual streams is screened; the B-only latent along u verifies (its
ablation and steering move B far more than the same edit moves A), the A-only candidate and a
shared latent do not. On a same-features null (B is A) a DFC's exclusive latents do not verify."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import crossdiff
from crossdiff.activations import Pairing
from crossdiff.analysis.verify import add_verification, screen_candidates, verify_latents
from crossdiff.analysis.verify_stats import bootstrap_mean_ci, wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
PAIRING = Pairing(name="resid-0", sites=((HOOK, HOOK),))
NAMES = ("A", "B")


def tiny_pair(edit: bool):
    torch.manual_seed(0)
    cfg = crossdiff.dense_config(
        "tiny", n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=48,
        d_vocab_out=48, n_ctx=24,
    )  # fmt: skip
    a = crossdiff.build_model(cfg).eval()
    b = copy.deepcopy(a)
    u = torch.randn(32, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()
    if edit:
        with torch.no_grad():
            scale = 4.0 * float(b.W_E.norm(dim=-1).mean())
            for t in (5, 6, 7, 8):  # the trigger tokens write u ...
                b.W_E[t] += scale * u
            b.W_U[:, 9] += 8.0 * u  # ... and u makes B predict token 9
    return a, b, u


def train_on_pair(a, b, partition=None, d_sae=160):
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 48, (600, 24), generator=g)
    rows[:, 0] = 0
    heldout = torch.randint(0, 48, (32, 24), generator=g)
    heldout[:, 0] = 0
    with torch.no_grad():
        acts = torch.stack(
            [m.run_with_cache(rows, names_filter=HOOK)[1][HOOK][:, 1:].reshape(-1, 32)
             for m in (a, b)], 1,
        )  # fmt: skip
    cfg = crossdiff.CrossCoderConfig(d_model=32, d_sae=d_sae, k=4, partition=partition)
    cc = crossdiff.train_crosscoder(
        acts, cfg, steps=800, batch_size=256, lr=3e-3, seed=0, log_every=10**9
    )
    diff = crossdiff.diff_features(
        cc, acts[:4000], show_progress=False, model_names=NAMES, latent_scaling=False
    )
    return cc, diff, heldout


def test_intervals():
    lo, hi = bootstrap_mean_ci(np.array([1.0, 2.0, 3.0, 4.0]), seed=0)
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert bootstrap_mean_ci(np.array([1.0])) == (None, None)
    lo, hi = wilson_interval(8, 10)
    assert 0.44 < lo < 0.5 and 0.94 < hi < 0.97  # Wilson's 95 % interval of 8/10
    assert wilson_interval(0, 0) == (None, None)


@pytest.mark.slow  # a crosscoder on two tiny models and the interventions (about 20 s)
def test_screen_and_verify_finds_the_planted_causal_feature():
    a, b, u = tiny_pair(edit=True)
    cc, diff, heldout = train_on_pair(a, b)
    candidates = screen_candidates(diff.table, NAMES, 4)
    dec = cc.W_dec.detach()
    cos_u = {j: float(torch.cosine_similarity(dec[j, 1], u, dim=0)) for j in candidates}
    planted = [j for j, m in candidates.items() if m == 1 and cos_u[j] > 0.5]
    assert planted, (candidates, cos_u)  # screening found a B-only latent along u
    # a shared latent whose decoder has no part along u: the same effect in both models
    table = diff.table
    shared_ids = table.loc[table["class"] == "shared"].sort_values("fire_count")["latent"]
    free = [int(j) for j in shared_ids
            if abs(float(torch.cosine_similarity(dec[int(j), 1], u, dim=0))) < 0.05]  # fmt: skip
    shared = free[-1]  # on the measured run: its effect in B is 1.2-3.5x A's, below 2x in one
    results = verify_latents(cc, (a, b), heldout, PAIRING, {**candidates, shared: 1},
                             model_names=NAMES)  # fmt: skip
    rec = results[planted[0]]
    assert rec["verified"], rec
    assert rec["ablation_kl"] > 2 * rec["ablation_kl_control"]
    assert rec["steering_kl"] > 5 * rec["steering_kl_control"]
    assert rec["steering_logits_own"]["up"][0][0] == "<9>"  # steering promotes the planted token
    for j, m in candidates.items():
        if m == 0:  # A has no planted feature: its candidates are not causal beyond B's
            assert not results[j]["verified"], results[j]
    assert not results[shared]["verified"]  # a shared token feature: the same effect in both
    add_verification(diff, {j: results[j] for j in candidates}, {"n": 4})
    per_class = diff.summary["verification"]["per_class"]
    assert per_class["B-only"]["n_verified"] >= 1
    assert diff.table.loc[planted[0], "verified"] is True
    from crossdiff.report.markdown import render_markdown
    from crossdiff.report.writer import report_data

    markdown = render_markdown(report_data(diff))
    assert "## Screen-and-verify" in markdown and "| B-only |" in markdown


@pytest.mark.slow  # a DFC on a model paired with itself (about 20 s)
def test_dfc_exclusive_latents_do_not_verify_on_a_same_features_null():
    a, b, _ = tiny_pair(edit=False)
    # a small dictionary, so the exclusive latents are used (with 160 latents they stay dead)
    cc, diff, heldout = train_on_pair(a, b, partition=(12, 12), d_sae=48)
    owner = cc.cfg.latent_owner()
    live = diff.table[(diff.table["fire_count"] > 0)]
    exclusive = {int(j): owner[int(j)] for j in live["latent"] if owner[int(j)] >= 0}
    assert exclusive, "no exclusive latent fires: the null tests nothing"
    results = verify_latents(cc, (a, b), heldout, PAIRING, exclusive, model_names=NAMES)
    tested = [r for r in results.values() if r["ablation_kl_rows"] >= 2 and r["ablation_kl"] > 0]
    assert len(tested) >= 5  # measured: 15 live exclusive latents, 8 firing on >= 2 rows
    assert not any(r["verified"] for r in results.values())
