"""The latent explorer on a crosscoder trained over planted data: band examples and histograms
agree with a brute-force encoding, every live latent gets its top examples, logit effects find a
planted unembedding direction, and `crossdiff inspect` prints a latent from the written files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossdiff import build_model, dense_config, moe_config
from crossdiff.analysis import diff_features
from crossdiff.analysis.contexts import band_samples
from crossdiff.analysis.explorer import explore, explorer_latents
from crossdiff.analysis.logit_effects import logit_effects, residual_models
from crossdiff.analysis.source import TokenSource
from crossdiff.cli import main
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
from crossdiff.crosscoder.synthetic import planted_crosscoder_data
from crossdiff.report import write_report

D_MODEL = 32
DOC_LEN = 40


class NewlineTokenizer:
    """Every fifth token id is a newline and every fifth-plus-one a tab."""

    name = "newline-stub"

    def decode(self, ids: list[int]) -> str:
        return {0: "\n", 1: "\t"}.get(ids[0] % 5, f" t{ids[0]}")


@pytest.fixture(scope="module")
def trained():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        acts, _ = planted_crosscoder_data(
            3000, D_MODEL, 6, 6, 6, densities={"shared": 0.05, "a_only": 0.03, "b_only": 0.08},
            seed=1,
        )  # fmt: skip
        cfg = CrossCoderConfig(d_model=D_MODEL, d_sae=36, k=3)
        cc = train_crosscoder(acts, cfg, steps=300, batch_size=128, lr=3e-3, log_every=10**9)
    finally:
        torch.set_num_threads(before)
    n = len(acts)
    g = torch.Generator().manual_seed(3)
    metadata = {
        "token_ids": torch.randint(0, 200, (n,), generator=g),
        "doc_ids": torch.arange(n) // DOC_LEN,
        "positions": torch.arange(n) % DOC_LEN,
        "domains": (torch.arange(n) // DOC_LEN) % 3,
    }
    diff = diff_features(
        cc, acts, metadata=metadata, tokenizer=NewlineTokenizer(), model_names=("dense", "moe"),
        show_progress=False, batch_size=500, n_top_contexts=6, context_window=3,
    )  # fmt: skip
    return cc, acts, metadata, diff


def test_band_samples_and_histograms_match_a_brute_force_encoding(trained):
    cc, acts, metadata, diff = trained
    source = TokenSource(acts, metadata, ("dense", "moe"))
    latents = explorer_latents(diff.table, 10**6)
    max_act = diff.top_values[latents, 0]
    picks, hist = band_samples(
        cc, source, [(0, len(acts))], latents, max_act, n_bands=4, per_band=3, n_bins=10,
        batch_size=256, seed=5,
    )  # fmt: skip
    with torch.no_grad():
        f = cc.encode(acts)[:, latents].double().numpy()
    checked_bands = 0
    for row, j in enumerate(latents):
        a = f[:, row]
        top = max_act[row]
        assert a.max() == pytest.approx(top, rel=1e-5)
        fired = a[a > 0]
        # the histogram counts every firing once, in the bin of its activation
        assert hist[row].sum() == len(fired) == diff.table.loc[j, "fire_count"]
        edges = np.linspace(0, top, 11)
        for b in range(10):
            n_in = ((fired > edges[b] * (1 + 1e-9)) & (fired <= edges[b + 1] * (1 - 1e-9))).sum()
            n_edge = (
                np.isclose(fired, edges[b + 1], rtol=1e-6).sum()
                + np.isclose(fired, edges[b], rtol=1e-6).sum()
            )
            assert n_in <= hist[row, b] <= n_in + n_edge
        for b in range(4):
            lo, hi = top * b / 4, top * (b + 1) / 4
            members = np.nonzero((a > lo) & (a <= hi))[0]
            got = [int(i) for i in picks[row, b] if i >= 0]
            assert len(got) == min(3, len(members)), (j, b)
            assert len(set(got)) == len(got)
            assert all(lo - 1e-6 < a[i] <= hi + 1e-6 for i in got), (j, b)
            checked_bands += len(members) > 3
    assert checked_bands > 10  # many bands had more firings than slots, so sampling was exercised
    again, _ = band_samples(
        cc, source, [(0, len(acts))], latents, max_act, n_bands=4, per_band=3, n_bins=10,
        batch_size=1000, seed=5,
    )  # fmt: skip
    assert (again == picks).all()  # the same seed picks the same tokens, whatever the batch


def test_explorer_covers_every_live_latent_with_its_top_examples(trained):
    cc, acts, metadata, diff = trained
    ex = explore(diff, n_top=6, n_bands=3, per_band=2)
    live = diff.table.loc[diff.table["fire_count"] > 0, "latent"].tolist()
    assert sorted(int(k) for k in ex["latents"]) == live
    assert ex["n_latents"] == len(live) > len(diff.details)  # more than the static panels
    with torch.no_grad():
        f = cc.encode(acts).numpy()
    for j in live:
        entry = ex["latents"][str(j)]
        fires = int(diff.table.loc[j, "fire_count"])
        assert len(entry["top"]) == min(6, fires)
        assert [c["a"] for c in entry["top"]] == pytest.approx(
            list(diff.top_values[j, : len(entry["top"])]), abs=1e-3
        )
        for ctx in entry["top"] + [c for band in entry["bands"] for c in band]:
            assert ctx["v"][ctx["c"]] == pytest.approx(ctx["a"], abs=1e-3)
            assert ctx["a"] == pytest.approx(float(f[ctx["i"], j]), abs=1e-3)
            # the window is the tokens around the centre, never outside its document
            first = ctx["i"] - ctx["c"]
            window = range(first, first + len(ctx["t"]))
            assert len(ctx["t"]) <= 7
            assert ctx["t"] == [int(metadata["token_ids"][t]) for t in window]
            assert ctx["v"] == pytest.approx([float(f[t, j]) for t in window], abs=1e-3)
            docs = {int(metadata["doc_ids"][t]) for t in window}
            assert docs == {int(metadata["doc_ids"][ctx["i"]])}
            if ctx["c"] < 3 and first > 0:  # cut short on the left only at a document start
                assert metadata["doc_ids"][first - 1] != metadata["doc_ids"][first]
        assert sum(entry["hist"]) == fires
    # the per-class limit keeps the latents with the largest activation mass
    small = explore(diff, per_class=1, n_top=2, per_band=1)
    classes = set(diff.table.loc[live, "class"])
    assert small["n_latents"] == len(classes)
    mass = diff.table["fire_count"] * diff.table["mean_activation"].fillna(0)
    for k in small["latents"]:
        cls = diff.table.loc[int(k), "class"]
        assert mass[int(k)] == mass[diff.table["class"] == cls].max()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    small = dict(d_model=D_MODEL, n_heads=2, d_head=16, n_layers=1, d_vocab=200, n_ctx=32)
    dense = build_model(dense_config("tiny", d_mlp=64, **small))
    moe = build_model(moe_config("tiny", **small))
    return {"dense": dense.eval(), "moe": moe.eval()}


def test_logit_effects_find_a_planted_unembedding_direction(trained, models):
    cc, *_ = trained
    w_dec = cc.W_dec.detach().clone()
    planted = {0: 17, 5: 123, 9: 4}  # latent -> token whose unembedding column it writes
    for j, t in planted.items():
        w_dec[j, 0] = models["dense"].W_U[:, t].detach()
        w_dec[j, 1] = -models["moe"].W_U[:, t].detach()
    eff = logit_effects(w_dec, list(planted), models, ["dense", "moe"], k=5)
    for j, t in planted.items():
        assert eff[j]["dense"]["top"][0][0] == f"<{t}>"  # no tokenizer: ids shown as <id>
        assert eff[j]["moe"]["bottom"][0][0] == f"<{t}>"  # the negated column suppresses it
        assert eff[j]["dense"]["top"][0][1] > eff[j]["dense"]["top"][1][1] > 0
    manifest = {"hook_points": {"dense": ["blocks.0.hook_resid_post"],
                                "moe": ["blocks.0.hook_mlp_out"]}}  # fmt: skip
    assert residual_models(manifest, ["dense", "moe"]) == {"dense": "blocks.0.hook_resid_post"}


def test_write_report_and_inspect(trained, models, tmp_path, capsys):
    cc, acts, metadata, diff = trained
    diff.source.manifest = {"hook_points": {"dense": ["blocks.0.hook_resid_post"],
                                            "moe": ["blocks.0.hook_resid_mid"]}}  # fmt: skip
    try:
        paths = write_report(diff, tmp_path / "report", quiet=True, models=models)
    finally:
        diff.source.manifest = {}
    ex = json.loads(paths["explorer"].read_text())
    report = json.loads(paths["json"].read_text())
    assert report["explorer"]["n_latents"] == ex["n_latents"] == len(ex["latents"])
    assert ex["logit_models"] == {"dense": "blocks.0.hook_resid_post",
                                  "moe": "blocks.0.hook_resid_mid"}  # fmt: skip
    assert all(set(e["logits"]) == {"dense", "moe"} for e in ex["latents"].values())
    shards = sorted(p.name for p in paths["sidecar"].glob("explorer-*.js"))
    assert len(shards) == -(-ex["n_latents"] // 64)
    page = paths["html"].read_text()
    assert all(f"report_files/{name}" in page for name in shards)  # named in the page's index
    first = next(iter(ex["latents"].values()))["top"][0]
    assert f'"v":{json.dumps(first["v"])}' not in page  # the examples themselves are not inline

    # a latent whose examples contain a newline token
    j = next(int(k) for k, e in ex["latents"].items()
             if any(t % 5 == 0 for c in e["top"] for t in c["t"]))  # fmt: skip
    capsys.readouterr()
    assert main(["inspect", str(tmp_path), str(j)]) == 0  # the run folder (report/ inside)
    out = capsys.readouterr().out
    row = report["latents"][j]
    assert out.startswith(f"latent {j}: {row['class']}")
    assert f"density {row['density']:.4g}" in out
    assert "lift" in out and "\u21b5" in out and "[[" in out
    first = ex["latents"][str(j)]["top"][0]
    assert (
        f"{first['a']:8.4g}"
        in out.splitlines()[
            out.splitlines().index(
                next(line for line in out.splitlines() if line.startswith("top activations"))
            )
            + 1
        ]
    )
    assert "logit effects, dense:" in out and "logit effects, moe:" in out
    for line in out.splitlines():  # one example, one line: raw newlines and tabs never leak
        assert "\t" not in line
    assert main(["inspect", str(tmp_path / "report"), str(len(report["latents"]))]) == 2
    assert "out of range" in capsys.readouterr().err
