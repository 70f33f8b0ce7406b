"""Expert attribution per (layer, expert): a trained crosscoder over planted activations with
planted two-layer routing, a real multi-layer harvest, the minimum-firings rule and the
bias-corrected estimators."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from crossdiff import CrossCoderConfig, diff_features, train_crosscoder
from crossdiff.activations import ActivationStore, harvest
from crossdiff.analysis.experts import miller_madow_entropy, resolve_layout, routing_kl
from crossdiff.crosscoder.synthetic import match_planted_latents, planted_crosscoder_data
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
N_EXPERTS, LAYERS = 4, (2, 4)  # two recorded MoE layers, named by their block index
X, Y, Z = 0, 1, 2  # planted latents: X prefers expert 1 in layer 2, Y expert 1 in layer 4, Z none
LAYOUT = [
    {"hook": f"blocks.{layer}.mlp.hook_expert_indices", "layer": layer, "n_experts": N_EXPERTS,
     "columns": [i, i + 1]}
    for i, layer in enumerate(LAYERS)
]  # fmt: skip


@pytest.fixture(scope="module")
def planted():
    """8 planted latents (4 shared, 2 per model-only kind), a crosscoder trained on them, and
    top-1 routing at two layers: uniform, except that where X fires layer 2 picks expert 1 with
    probability 0.9, and where Y fires layer 4 does. Pooled into one id space, they look alike."""
    densities = {"shared": 0.08, "a_only": 0.08, "b_only": 0.08}
    acts, truth = planted_crosscoder_data(8000, 16, 4, 2, 2, densities=densities, seed=0)
    cc = train_crosscoder(
        acts, CrossCoderConfig(d_model=16, d_sae=32, k=1), steps=400, batch_size=256, lr=3e-3,
        seed=0, log_every=1000,
    )  # fmt: skip
    matches = match_planted_latents(cc.W_dec.detach(), cc.decoder_norms().detach(), truth)
    assert matches["recovered_fraction"] == 1.0
    latent = {i: matches["matches"][i]["latent"] for i in (X, Y, Z)}
    # the planted codes (orthonormal directions, no noise): which planted latent fires per token
    code = torch.einsum("nd,ld->nl", acts[:, 0], truth.directions[:, 0])
    g = torch.Generator().manual_seed(1)
    experts = torch.randint(0, N_EXPERTS, (len(acts), 2), generator=g)
    for planted_id, column in ((X, 0), (Y, 1)):
        prefer = (code[:, planted_id] > 0.25) & (torch.rand(len(acts), generator=g) < 0.9)
        experts[prefer, column] = 1
    return acts, cc, latent, {"experts": experts}


@pytest.fixture(scope="module")
def by_layer(planted):
    acts, cc, _, metadata = planted
    return diff_features(
        cc, acts, metadata=metadata, expert_layout=LAYOUT, show_progress=False, batch_size=2000
    )


def test_layer_expert_preference_is_recovered_where_pooling_mixes_it(planted, by_layer):
    acts, cc, latent, metadata = planted
    t = by_layer.table
    x, y, z = t.loc[latent[X]], t.loc[latent[Y]], t.loc[latent[Z]]
    assert (x["top_expert_layer"], x["top_expert"]) == (2, 1)
    assert (y["top_expert_layer"], y["top_expert"]) == (4, 1)
    assert x["top_expert_lift"] > 2.5 and y["top_expert_lift"] > 2.5
    assert x["expert_kl"] > 0.8 and y["expert_kl"] > 0.8
    assert x["top_expert_share"] > 0.85
    # no routing preference: KL near 0, no pair far above its base rate
    assert z["expert_kl"] < 0.05 and z["top_expert_lift"] < 1.3
    # X's other layer is uniform: its per-layer KL there is about 0
    details = by_layer.details.get(latent[X])
    if details is not None:
        other = details["expert_layers"][1]
        assert other["layer"] == 4 and max(other["lift"]) < 1.3
    ex = by_layer.summary["experts"]
    assert ex["n_layers"] == 2 and ex["layers"] == [2, 4]
    assert ex["n_experts_per_layer"] == [4, 4] and ex["n_pairs"] == 8
    assert ex["layout_source"] == "expert_layout argument"
    np.testing.assert_allclose([sum(r) for r in ex["routing_base_rate"]], 1.0)
    assert ex["routing_base_rate"][0][1] > 0.28  # X pulls expert 1 of layer 2 above 0.25
    assert set(ex["mean_kl_per_class_per_layer"]["shared"]) and ex["min_firings"] == 20
    # pooled (no layout): one id space of 4 experts, X and Y get the same top expert
    pooled = diff_features(cc, acts, metadata=metadata, show_progress=False, batch_size=2000)
    px, py = pooled.table.loc[latent[X]], pooled.table.loc[latent[Y]]
    assert (px["top_expert_layer"], px["top_expert"]) == (py["top_expert_layer"], py["top_expert"])
    assert pooled.summary["experts"]["n_pairs"] == 4
    assert pooled.summary["experts"]["layout_source"] == "one layer (no column-to-layer map)"


def test_latents_below_the_minimum_get_no_attribution(planted, by_layer):
    acts, cc, latent, metadata = planted
    fires = by_layer.table["fire_count"].to_numpy()
    minimum = int(np.sort(fires[fires > 0])[(fires > 0).sum() // 2])  # the median firing count
    diff = diff_features(
        cc, acts, metadata=metadata, expert_layout=LAYOUT, min_expert_firings=minimum,
        show_progress=False, batch_size=2000,
    )  # fmt: skip
    t = diff.table
    below = (fires > 0) & (fires < minimum)
    assert 0 < below.sum() < (fires > 0).sum()  # measured: 5 of the 10 live latents below
    assert t.loc[fires == minimum, "top_expert"].ge(0).all()  # exactly at the minimum: attributed
    assert (t.loc[below, "top_expert"] == -1).all() and (
        t.loc[below, "top_expert_layer"] == -1
    ).all()
    for col in ("top_expert_share", "top_expert_lift", "expert_kl", "expert_entropy"):
        assert t.loc[below, col].isna().all()
        assert t.loc[~below & (fires > 0), col].notna().all()
    np.testing.assert_array_equal(t["expert_firings"], fires)  # every token has routing
    ex = diff.summary["experts"]
    assert ex["min_firings"] == minimum and ex["n_below_min_firings"] == int(below.sum())
    with pytest.raises(CrossdiffError, match="min_expert_firings"):
        diff_features(cc, acts, metadata=metadata, min_expert_firings=0, show_progress=False)


def test_miller_madow_entropy_and_kl_on_known_samples():
    # 3 of one category, 1 of another: plug-in 0.8113 bits, plus (2 - 1) / (2 * 4 * ln 2)
    got = miller_madow_entropy(np.array([3.0, 1.0, 0.0, 0.0]))
    assert float(got) == pytest.approx(0.811278 + 1 / (8 * math.log(2)), abs=1e-5)
    assert np.isnan(miller_madow_entropy(np.zeros(4)))
    # 20 draws from 8 equally likely experts: the plug-in estimate is biased low, MM much less
    rng = np.random.default_rng(0)
    samples = np.stack([np.bincount(rng.integers(0, 8, 20), minlength=8) for _ in range(4000)])
    p = samples / 20
    plug_in = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0)).sum(1).mean()
    corrected = miller_madow_entropy(samples.astype(float)).mean()
    assert 3 - plug_in > 0.25  # measured: 0.284 bits low
    assert abs(3 - corrected) < 0.12  # measured: 0.095 bits low (clipped at 3 from above)
    # KL of a sample drawn from the base itself: plug-in 0.284 bits on average, corrected less
    base = np.full(8, 1 / 8)
    kl = routing_kl(samples.astype(float), base)
    assert kl.mean() < 0.12 and np.median(kl) < 0.05 and (kl >= 0).all()  # 0.095, 0.037
    assert float(routing_kl(np.array([10.0, 0, 0, 0]), np.full(4, 0.25))) == pytest.approx(2.0)


def test_layout_from_old_manifests_and_bad_layouts():
    layers, source = resolve_layout(None, {"experts": {"hooks": ["blocks.2.mlp.x"], "width": 2}}, 2)
    assert len(layers) == 1 and layers[0].layer == 2 and layers[0].n_experts is None
    assert source == "one layer (no column-to-layer map)"
    hooks = [f"blocks.{i}.mlp.hook_expert_indices" for i in range(3)]
    layers, source = resolve_layout(None, {"experts": {"hooks": hooks, "width": 6}}, 6)
    assert [(lay.layer, lay.columns) for lay in layers] == [(0, (0, 2)), (1, (2, 4)), (2, (4, 6))]
    assert source.startswith("inferred")
    with pytest.raises(CrossdiffError, match="does not fit"):
        resolve_layout([{"layer": 0, "columns": [0, 3]}], None, 2)
    with pytest.raises(CrossdiffError, match="layer twice"):
        resolve_layout([{"layer": 0, "columns": [0, 1]}, {"layer": 0, "columns": [1, 2]}], None, 2)
    # an expert id beyond the layout's n_experts is refused
    acts = torch.randn(50, 2, 4)
    cc_cfg = CrossCoderConfig(d_model=4, d_sae=8, k=2)
    cc = train_crosscoder(acts, cc_cfg, steps=2, batch_size=10, log_every=1000)
    experts = torch.full((50, 1), 5)
    with pytest.raises(CrossdiffError, match="has 4 experts"):
        diff_features(
            cc, acts, metadata={"experts": experts}, show_progress=False,
            expert_layout=[{"layer": 0, "n_experts": 4, "columns": [0, 1]}],
        )  # fmt: skip


def test_all_layers_harvest_writes_the_map_and_diff_reports_every_pair(tmp_path):
    from crossdiff.models import build_model, dense_config, moe_config

    cfg = dict(n_layers=5, d_model=8, d_head=4, n_heads=2, d_mlp=16, d_vocab=40, n_ctx=16)
    dense = build_model(dense_config("tiny", **cfg))
    moe = build_model(moe_config("tiny", num_experts=4, **cfg))
    tokens = torch.randint(1, 40, (12, 10), generator=torch.Generator().manual_seed(0))
    tokens = TokenSet(
        tokens=tokens,
        doc_ids=torch.arange(12)[:, None].expand(12, 10).clone(),
        doc_positions=torch.arange(10)[None].expand(12, 10).clone(),
        domains=torch.arange(12) % 3,
    )
    store = harvest(
        dense, moe, tokens, "mlp-all-layers", tmp_path / "s", dtype="float32", progress=False
    )
    layout = store.manifest["experts"]["layout"]
    assert [e["layer"] for e in layout] == [0, 1, 2, 3, 4]
    assert [e["columns"] for e in layout] == [[2 * i, 2 * i + 2] for i in range(5)]
    assert all(e["n_experts"] == 4 for e in layout)
    assert layout[3]["hook"] == "blocks.3.mlp.hook_expert_indices"
    # the columns hold each layer's own routing
    _, cache = moe.run_with_cache(tokens.tokens)
    recorded = store.read_metadata()["experts"]
    for e in layout:
        want = cache[e["hook"]].reshape(12, 10, 2)[:, 1:].reshape(-1, 2)  # stock: [batch*pos, k]
        assert torch.equal(recorded[:, slice(*e["columns"])], want)

    cc = train_crosscoder(
        store, CrossCoderConfig(d_model=40, d_sae=16, k=2), steps=10, batch_size=27,
        log_every=1000,
    )  # fmt: skip
    diff = diff_features(cc, store, show_progress=False, min_expert_firings=1)
    ex = diff.summary["experts"]
    assert ex["layout_source"] == "manifest"
    assert ex["n_layers"] == 5 and ex["n_experts_per_layer"] == [4] * 5 and ex["n_pairs"] == 20
    live = diff.table["fire_count"] > 0
    assert diff.table.loc[live, "top_expert_layer"].isin(range(5)).all()
    assert diff.expert_counts.shape == (16, 20)

    # a store written before the map existed: inferred from its hooks, and it still resumes
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["experts"]["layout"]
    path.write_text(json.dumps(manifest))
    # the manifest edit changes the store's fingerprint, so the crosscoder is applied knowingly
    old = diff_features(
        cc, ActivationStore(tmp_path / "s"), show_progress=False, allow_mismatch=True
    )
    assert old.summary["experts"]["n_pairs"] == 20
    assert old.summary["experts"]["layout_source"].startswith("inferred")
    harvest(dense, moe, tokens, "mlp-all-layers", tmp_path / "s", dtype="float32", progress=False)
