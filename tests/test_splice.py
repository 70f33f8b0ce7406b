"""Spliced-in LM loss: exact, ablating and partial crosscoders give the losses they must, on trained
tiny dense and MoE models, for a resid, an mlp_out and the multi-layer pairing; then a trained
crosscoder through evaluate_crosscoder."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformer_lens import HookedTransformer

import crossdiff
from crossdiff.activations import Pairing, harvest, load_pairing
from crossdiff.crosscoder.spliced_loss import loss_recovered, spliced_loss, summary_lines
from crossdiff.plumbing.common import CrossdiffError

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
V = 32
SEQ = 16
MLP_1 = Pairing(name="mlp1", sites=(("blocks.1.hook_mlp_out", "blocks.1.hook_mlp_out"),))
PAIRINGS = {"paper": 16, "mlp1": 16, "mlp-all-layers": 5 * 16}  # pairing -> crosscoder width


def markov_rows(n: int, seed: int) -> torch.Tensor:
    """BOS (0), then a next-token rule with 10% noise: learnt in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, SEQ, dtype=torch.long)
    x[:, 1] = torch.randint(1, V, (n,), generator=g)
    for t in range(2, SEQ):
        rule = (x[:, t - 1] + 6) % (V - 1) + 1  # a cycle through all ids but 0
        noise = torch.rand(n, generator=g) < 0.1
        x[:, t] = torch.where(noise, torch.randint(1, V, (n,), generator=g), rule)
    return x


def _train(model: HookedTransformer, steps: int = 40) -> HookedTransformer:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for step in range(steps):
        loss = model(markov_rows(16, step), return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models() -> tuple[HookedTransformer, HookedTransformer]:
    """A trained tiny dense model and crossdiff MoE (5 layers, d_model 16)."""
    torch.manual_seed(0)  # the models' init must not depend on which tests ran before
    shape = dict(d_model=16, n_heads=2, d_head=8, d_vocab=V, n_ctx=SEQ, device="cpu")
    dense = crossdiff.build_model(crossdiff.dense_config("tiny", d_mlp=32, **shape))
    moe = crossdiff.build_model(
        crossdiff.moe_config("tiny", d_mlp=16, num_experts=4, seed=1, **shape)
    )
    return _train(dense), _train(moe)


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    return markov_rows(8, seed=10_000)


def exact_crosscoder(d: int, keep_dims: list[int] | None = None) -> crossdiff.CrossCoder:
    """decode(encode(x)) = x: latent pairs +e_i / -e_i per model and dimension (ReLU splits the
    sign). With `keep_dims[m]`, model m's decoder is zero beyond its first keep_dims[m] dims."""
    cc = crossdiff.CrossCoder(crossdiff.CrossCoderConfig(n_models=2, d_model=d, d_sae=4 * d, k=8))
    eye = torch.eye(d)
    with torch.no_grad():
        for p in (cc.W_enc, cc.W_dec_untied, cc.b_enc, cc.b_dec, cc.threshold):
            p.zero_()
        for m in range(2):
            for s, sign in enumerate((1.0, -1.0)):
                cols = slice((2 * m + s) * d, (2 * m + s + 1) * d)
                cc.W_enc[m, :, cols] = sign * eye
                cc.W_dec_untied[cols, m, :] = sign * eye
            if keep_dims is not None:
                cc.W_dec_untied[:, m, keep_dims[m] :] = 0
    return cc


def constant_crosscoder(d: int, value: list[torch.Tensor] | None = None) -> crossdiff.CrossCoder:
    """Reconstructs every token as b_dec: zero (zero ablation) or the given per-model values."""
    cc = exact_crosscoder(d)
    with torch.no_grad():
        cc.W_dec_untied.zero_()
        for m, v in enumerate(value or []):
            cc.b_dec[m, : v.shape[0]] = v
    return cc


def ce_with(model, tokens, patches: dict) -> float:
    """Mean next-token CE with hook -> fn(act) patches, computed here independently."""
    hooks = [(name, lambda act, hook, fn=fn: fn(act)) for name, fn in patches.items()]
    return float(model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks))


@pytest.mark.parametrize("pairing", list(PAIRINGS))
def test_exact_reconstruction_recovers_all_the_loss(models, heldout, pairing):
    the_pairing = MLP_1 if pairing == "mlp1" else load_pairing(pairing)
    cc = exact_crosscoder(PAIRINGS[pairing])
    result = spliced_loss(cc, models, heldout, the_pairing, batch_size=3)
    n_sites = len(the_pairing.sites)
    assert result["n_targets"] == 8 * (SEQ - 1) and result["n_spliced_positions"] == 8 * (SEQ - 1)
    for name, model in zip(("dense", "moe"), models, strict=True):
        r = result["models"][name]
        clean = float(model(heldout, return_type="loss").detach())
        assert r["ce_clean"] == pytest.approx(clean, abs=1e-5)
        assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-5)
        assert r["ce_zero_ablated"] - r["ce_clean"] > 0.05  # ablation hurts: a meaningful ratio
        assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
        assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
        assert [s["hook"] for s in r["per_site"]] == list(the_pairing.hooks_a)
        assert len(r["per_site"]) == n_sites
        for site in r["per_site"]:
            assert site["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-5)


def test_reconstruction_equal_to_the_ablation_recovers_nothing(models, heldout):
    dense, moe = models
    zero = spliced_loss(constant_crosscoder(16), models, heldout, "paper")
    hook = "blocks.2.hook_resid_post"

    def zero_after_bos(act):  # BOS keeps its clean activation: the harvest skips it
        act = act.clone()
        act[:, 1:] = 0
        return act

    for name, model in (("dense", dense), ("moe", moe)):
        r = zero["models"][name]
        assert r["ce_zero_ablated"] == pytest.approx(
            ce_with(model, heldout, {hook: zero_after_bos}), abs=1e-5
        )
        assert r["ce_spliced"] == pytest.approx(r["ce_zero_ablated"], abs=1e-6)
        assert r["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-5)
    # the mean over the evaluated (non-BOS) tokens, computed here
    means = []
    for model in models:
        _, cache = model.run_with_cache(heldout, names_filter=hook)
        means.append(cache[hook][:, 1:].reshape(-1, model.cfg.d_model).mean(0))
    mean = spliced_loss(constant_crosscoder(16, means), models, heldout, "paper")
    for name in ("dense", "moe"):
        r = mean["models"][name]
        assert r["ce_spliced"] == pytest.approx(r["ce_mean_ablated"], abs=1e-5)
        assert r["loss_recovered_mean"] == pytest.approx(0.0, abs=1e-4)
        assert r["ce_mean_ablated"] - r["ce_clean"] > 0.1
    given = spliced_loss(constant_crosscoder(16), models, heldout, "paper", ablation_means=means)
    assert given["models"]["moe"]["ce_mean_ablated"] == pytest.approx(
        mean["models"]["moe"]["ce_mean_ablated"], abs=1e-5
    )
    assert given["mean_ablation"] == "given means"


def test_all_sites_and_one_site_splicing_differ_as_they_must(models, heldout):
    """Exact on layer 0's MLP output, zero elsewhere: layer 0 alone recovers everything, each other
    layer alone nothing, and all at once equals zeroing layers 1-4 only."""
    dense, moe = models
    cc = exact_crosscoder(80, keep_dims=[16, 16])
    result = spliced_loss(cc, models, heldout, "mlp-all-layers")
    hooks = [f"blocks.{layer}.hook_mlp_out" for layer in range(5)]

    def zero_after_bos(act):
        act = act.clone()
        act[:, 1:] = 0
        return act

    for name, model in (("dense", dense), ("moe", moe)):
        r = result["models"][name]
        first, *rest = r["per_site"]
        assert first["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-5)
        for site in rest:
            assert site["ce_spliced"] == pytest.approx(site["ce_zero_ablated"], abs=1e-5)
        expected = ce_with(model, heldout, {h: zero_after_bos for h in hooks[1:]})
        assert r["ce_spliced"] == pytest.approx(expected, abs=1e-5)
        assert r["ce_zero_ablated"] > r["ce_spliced"] + 0.05  # layer 0 kept: less damage
        recovered = loss_recovered(r["ce_clean"], r["ce_spliced"], r["ce_zero_ablated"])
        assert r["loss_recovered_zero"] == pytest.approx(recovered)
        assert 0.05 < r["loss_recovered_zero"] < 0.95


def test_wrong_widths_models_and_tokens_are_clear_errors(models, heldout):
    with pytest.raises(CrossdiffError, match="width 40"):
        spliced_loss(exact_crosscoder(40), models, heldout, "paper")
    with pytest.raises(CrossdiffError, match="reads 2 models"):
        spliced_loss(exact_crosscoder(16), models[:1], heldout, "paper")
    with pytest.raises(CrossdiffError, match="vocabulary has only"):
        spliced_loss(exact_crosscoder(16), models, heldout + V, "paper")
    with pytest.raises(CrossdiffError, match="no tokens"):
        crossdiff.evaluate_crosscoder(
            exact_crosscoder(16), torch.zeros(4, 2, 16), models=models, pairing="paper"
        )


def test_a_trained_crosscoder_recovers_most_of_the_loss(models, heldout, tmp_path):
    """Harvest the trained models, train a crosscoder, splice: trained (FVE ~0.98) it recovers
    about all the loss, after 5 steps far less; evaluate_crosscoder uses the store's pairing."""
    store = harvest(
        *models, markov_rows(256, seed=5), "paper", tmp_path / "store", progress=False,
        model_names=("dense", "moe"),
    )  # fmt: skip
    cfg = crossdiff.CrossCoderConfig(n_models=2, d_model=16, d_sae=128, k=12)
    results = {}
    for steps in (5, 300):
        cc = crossdiff.train_crosscoder(store, cfg, steps=steps, batch_size=256, log_every=10_000)
        results[steps] = crossdiff.evaluate_crosscoder(
            cc, store, models=models, tokens=heldout, splice_sequences=6
        )
    trained = results[300]["spliced_loss"]
    assert trained["n_sequences"] == 6
    for name in ("dense", "moe"):
        r = trained["models"][name]
        assert results[300]["fve_per_model"][0] > 0.9
        # measured 1.010 (dense) and 1.001 (moe): on this task the reconstruction even denoises
        assert 0.9 < r["loss_recovered_zero"] < 1.1 and 0.9 < r["loss_recovered_mean"] < 1.1
        assert abs(r["ce_spliced"] - r["ce_clean"]) < 0.1 < r["ce_zero_ablated"] - r["ce_clean"]
        early = results[5]["spliced_loss"]["models"][name]  # measured 0.36 and 0.49
        assert early["loss_recovered_zero"] < r["loss_recovered_zero"] - 0.3
    lines = summary_lines(trained)
    assert len(lines) == 2 and lines[0].startswith("spliced loss dense: CE clean")


@pytest.mark.slow
def test_micro_run_and_report_command_show_the_spliced_loss(tmp_path, capsys):
    """`crossdiff run` (micro, shortened) puts the spliced loss per model into report.json/md/html
    and its printed summary; `crossdiff report` finds the run's models and held-out rows."""
    from crossdiff.report import commands
    from crossdiff.run.pipeline import _summary_lines, run_pipeline

    out = tmp_path / "run"
    overrides = {
        "models": {"steps": 10, "checkpoint_every": 10},
        "store": {"n_tokens": 4_000},
        "crosscoder": {"steps": 30},
        "report": {"max_tokens": 4_000, "splice_sequences": 4},
    }
    summary = run_pipeline(out, "micro", overrides=overrides, device="cpu")
    report = json.loads((out / "report" / "report.json").read_text())
    spliced = report["summary"]["spliced_loss"]
    assert spliced["n_sequences"] == 4 and set(spliced["models"]) == {"dense", "moe"}
    for r in spliced["models"].values():
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated"):
            assert 0 < r[key] < 20, (key, r[key])
        assert r["sites"] == ["blocks.2.hook_resid_post"]
        assert r["ce_zero_ablated"] > r["ce_clean"]
        assert -1 < r["loss_recovered_zero"] <= 1.2
    assert "## Spliced-in language-model loss" in (out / "report" / "report.md").read_text()
    assert "loss recovered dense (vs zero / mean)" in (out / "report" / "report.html").read_text()
    lines = _summary_lines(summary.metrics["diff"])
    assert sum(line.startswith("spliced loss ") for line in lines) == 2
    # the clean and ablated sums are kept outside RUN/report (which a new crosscoder clears)
    assert len(list((out / "cache" / "splice").glob("splice-*.json"))) == 1

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["report", "--crosscoder", str(out / "crosscoder"), "--store", str(out / "store"),
         "--out", str(tmp_path / "again"), "--device", "cpu", "--splice-sequences", "4"]
    )  # fmt: skip
    capsys.readouterr()
    assert args.func(args) == 0
    assert "spliced loss moe: CE clean" in capsys.readouterr().out
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["summary"]["spliced_loss"]["models"] == spliced["models"]
    assert len(list((tmp_path / "again" / "splice-cache").glob("splice-*.json"))) == 1


@pytest.mark.slow  # 7-15 s on the shared machine, mostly the figures
def test_report_files_show_the_spliced_loss_with_numbers_from_report_json(
    models, heldout, tmp_path
):
    from test_analysis_planted import planted
    from test_report_files import unmatched_numbers

    from crossdiff.analysis import diff_features
    from crossdiff.report import write_report

    spliced = spliced_loss(
        exact_crosscoder(80, keep_dims=[16, 16]), models, heldout, "mlp-all-layers"
    )
    assert spliced["notes"]  # late layers' ablations barely hurt: the report must say so
    p = planted(n_tokens=3000)
    diff = diff_features(p.cc, p.acts, metadata=p.metadata, show_progress=False, batch_size=1000)
    diff.summary["spliced_loss"] = spliced
    paths = write_report(diff, tmp_path / "spliced", quiet=True)
    md, data = paths["md"].read_text(), json.loads(paths["json"].read_text())
    assert data["summary"]["spliced_loss"]["models"]["moe"]["per_site"][4]["hook"] == (
        "blocks.4.hook_mlp_out"
    )
    assert unmatched_numbers(md, data) == []
    r = spliced["models"]["dense"]
    row = f"| dense | all | {r['ce_clean']:.4g} | {r['ce_spliced']:.4g} |"
    assert row in md and "| moe | blocks.3.hook_mlp_out |" in md
    assert all(f"- {note}" in md for note in spliced["notes"])
    page = paths["html"].read_text()
    assert f"{r['loss_recovered_zero']:.3g} / {r['loss_recovered_mean']:.3g}" in page
