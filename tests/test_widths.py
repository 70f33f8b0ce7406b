"""Models of different widths: a crosscoder with one encoder and decoder block per model at that
model's width (padded to the widest, the padding held at exactly zero), per-model metrics on each
model's own width, the equal-width path unchanged, and the whole flow on two tiny transformers of
d_model 32 and 48."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_harvest import tiny_model, tiny_token_set

import crossdiff
import crossdiff.crosscoder.commands as commands
from crossdiff.activations import harvest
from crossdiff.analysis import diff_features
from crossdiff.crosscoder import (
    CrossCoder,
    CrossCoderConfig,
    evaluate_crosscoder,
    train_crosscoder,
)
from crossdiff.crosscoder.config import store_widths
from crossdiff.crosscoder.synthetic import (
    InMemoryStore,
    match_planted_latents,
    planted_crosscoder_data,
)
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.integrity import sha256_of_file, write_checksum
from crossdiff.report import write_report

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def padding_values(cc) -> torch.Tensor:
    """Every padded coordinate of W_enc, W_dec and b_dec (beyond each model's own width)."""
    out = []
    for m, width in enumerate(cc.cfg.widths):
        out += [
            cc.W_enc[m, width:].flatten(),
            cc.W_dec[:, m, width:].flatten(),
            cc.b_dec[m, width:].flatten(),
        ]
    return torch.cat(out).detach()


def direct_fve(cc, acts: torch.Tensor, widths) -> list[float]:
    """1 - SSE / SST per model, each over that model's own width only (no padding)."""
    with torch.no_grad():
        recon = cc.decode(cc.encode(acts.float())).double()
    fves = []
    for m, width in enumerate(widths):
        x, x_hat = acts[:, m, :width].double(), recon[:, m, :width]
        sse = (x - x_hat).pow(2).sum()
        sst = (x - x.mean(0)).pow(2).sum()
        fves.append(float(1 - sse / sst))
    return fves


def test_config_takes_a_width_per_model_and_checks_it():
    cfg = CrossCoderConfig(d_models=(48, 32), d_sae=64, k=4)
    assert (cfg.d_model, cfg.d_in, cfg.widths, cfg.padded) == (48, 96, (48, 32), True)
    assert cfg.to_dict()["d_models"] == [48, 32]
    again = CrossCoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.widths == (48, 32) and again.d_model == 48
    equal = CrossCoderConfig(d_model=16, d_sae=32, k=2)
    assert equal.widths == (16, 16) and not equal.padded and "d_models" not in equal.to_dict()
    assert not CrossCoderConfig(d_models=(16, 16), d_sae=32, k=2).padded
    with pytest.raises(CrossdiffError, match="one positive integer width per model"):
        CrossCoderConfig(d_models=(48,), d_sae=64, k=4)
    with pytest.raises(CrossdiffError, match="the widest of d_models"):
        CrossCoderConfig(d_model=32, d_models=(48, 32), d_sae=64, k=4)
    with pytest.raises(CrossdiffError, match="shared_decoder='free'"):
        CrossCoderConfig(d_models=(48, 32), d_sae=64, k=4, n_shared=4, shared_decoder="tied")
    assert store_widths(InMemoryStore(torch.ones(4, 2, 8), d_models=(8, 6))) == (8, 6)
    assert store_widths(InMemoryStore(torch.ones(4, 2, 8))) is None

    cc = CrossCoder(cfg)
    assert float(padding_values(cc).abs().max()) == 0.0
    # each model's decoder vector has the initial norm on its own width
    torch.testing.assert_close(cc.W_dec.norm(dim=-1), torch.full((64, 2), 0.1))
    with pytest.raises(CrossdiffError, match=r"widths \[48, 32\]: pad each narrower model"):
        cc.encode(torch.zeros(3, 2, 32))


def test_equal_width_path_is_unchanged():
    """Same seed -> identical weights with and without d_models, the pre-change state-dict keys
    and cfg.json, and the forward pass equal to the pre-change formula bit for bit."""
    acts, _ = planted_crosscoder_data(2048, 16, 8, 4, 4, seed=3)
    kw = dict(steps=40, batch_size=128, lr=3e-3, seed=1)
    plain = train_crosscoder(acts, CrossCoderConfig(d_model=16, d_sae=48, k=3, n_shared=4), **kw)
    given = train_crosscoder(
        acts, CrossCoderConfig(d_models=(16, 16), d_sae=48, k=3, n_shared=4), **kw
    )
    a, b = plain.state_dict(), given.state_dict()
    assert sorted(a) == sorted(
        ["W_dec_tied", "W_dec_untied", "W_enc", "b_dec", "b_enc", "scaling_factors", "threshold"]
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "d_models" not in plain.cfg.to_dict()

    x = acts[:256]
    with torch.no_grad():
        pre = x.reshape(256, -1) @ plain.W_enc.reshape(32, 48) + (
            plain.b_enc - plain.b_dec.reshape(-1) @ plain.W_enc.reshape(32, 48)
        )
        scores = pre.relu() * plain.selection_weights()
        f = torch.where(scores > plain.threshold, pre.relu(), torch.zeros_like(pre))
        out = (f @ plain.W_dec.reshape(48, 32)).view(256, 2, 16) + plain.b_dec
        assert torch.equal(plain.encode(x), f)
        assert torch.equal(plain.decode(plain.encode(x)), out)


@pytest.mark.slow
def test_training_on_planted_features_of_widths_48_and_32(tmp_path):
    """Planted shared / A-only / B-only features in spaces of widths 48 and 32 are recovered and
    classed as planted; the padding stays exactly zero through training, folding, save and load;
    per-model FVE and MSE use each model's own width."""
    acts, truth = planted_crosscoder_data(
        16000, 48, 16, 8, 8, densities=(0.01, 0.05), scales=(1.0, 2.0), seed=0, d_models=(48, 32)
    )
    assert float(acts[:, 1, 32:].abs().max()) == 0.0
    cfg = CrossCoderConfig(d_models=(48, 32), d_sae=48, k=0.8)
    cc = train_crosscoder(acts, cfg, steps=700, batch_size=256, lr=3e-3, seed=0)
    assert float(padding_values(cc).abs().max()) == 0.0
    assert cc.padding_max_abs() == 0.0
    # normalization to sqrt(width) per model: sqrt(48) and sqrt(32) over the mean norms
    mean_norm = acts.norm(dim=-1).mean(0)
    torch.testing.assert_close(
        cc.scaling_factors, torch.tensor([48**0.5, 32**0.5]) / mean_norm, rtol=0.02, atol=0
    )
    result = match_planted_latents(cc.W_dec, cc.decoder_norms(), truth)
    assert result["recovered_fraction"] >= 0.9
    assert result["classified_fraction"] >= 0.95
    kinds = {m["kind"] for m in result["matches"] if m["cosine"] >= 0.9 and m["class"] == m["kind"]}
    assert kinds == {"shared", "a_only", "b_only"}

    ev = evaluate_crosscoder(cc, acts)
    assert ev["fve_per_model"] == pytest.approx(direct_fve(cc, acts, (48, 32)), abs=1e-9)
    with torch.no_grad():
        recon = cc.decode(cc.encode(acts))
    sse_b = (recon[:, 1, :32] - acts[:, 1, :32]).double().pow(2).sum()
    assert ev["mse_per_model"][1] == pytest.approx(float(sse_b / (len(acts) * 32)), rel=1e-9)
    assert float(recon[:, 1, 32:].abs().max()) == 0.0  # the padded part reconstructs to zero

    # save and load keep the padding at zero; weights with padding edited are refused on save
    cc.save(tmp_path)
    loaded = CrossCoder.load(tmp_path)
    assert loaded.cfg.widths == (48, 32)
    assert float(padding_values(loaded).abs().max()) == 0.0
    assert torch.equal(loaded.encode(acts[:512]), cc.encode(acts[:512]))
    with torch.no_grad():
        loaded.W_dec_untied[0, 1, 40] = 0.5
    with pytest.raises(CrossdiffError, match="beyond a model's width"):
        loaded.save(tmp_path / "edited")


def test_padding_errors_are_refused(tmp_path):
    acts, _ = planted_crosscoder_data(512, 48, 4, 2, 2, seed=0, d_models=(48, 32))
    cfg = CrossCoderConfig(d_models=(48, 32), d_sae=16, k=2)
    bad = acts.clone()
    bad[:, 1, 40] = 1.0
    with pytest.raises(CrossdiffError, match=r"non-zero values in columns 32..47"):
        train_crosscoder(bad, cfg, steps=2, batch_size=64)
    with pytest.raises(CrossdiffError, match=r"non-zero values in columns 32..47"):
        evaluate_crosscoder(CrossCoder(cfg), bad)
    with pytest.raises(CrossdiffError, match=r"non-zero values in columns 32..47"):
        diff_features(CrossCoder(cfg), bad, show_progress=False)
    store = InMemoryStore(acts, d_models=(48, 32))
    with pytest.raises(CrossdiffError, match=r"d_models=\[48, 32\].*CrossCoderConfig\(d_models"):
        train_crosscoder(store, CrossCoderConfig(d_model=48, d_sae=16, k=2), steps=2)
    # a file whose padding was edited is refused on load
    cc = CrossCoder(cfg)
    file = cc.save(tmp_path) / "sae_weights.safetensors"
    weights = load_file(file)
    weights["b_dec"][1, 33] = 2.0
    save_file(weights, file)
    write_checksum(file, sha256_of_file(file))  # a consistent checksum: only the padding is off
    with pytest.raises(CrossdiffError, match="beyond a model's width"):
        CrossCoder.load(tmp_path)


@pytest.mark.slow  # about 12 s, most of it the report's figures
def test_harvest_train_evaluate_diff_report_with_d_model_32_and_48(tmp_path):
    dense = tiny_model(seed=0, d_model=48)
    moe = tiny_model(seed=1, d_model=32, moe=True)
    ts = tiny_token_set(n_seq=80, seq_len=16)
    store = harvest(
        dense, moe, ts, "paper", tmp_path / "store", batch_size=8, shard_tokens=200,
        heldout_fraction=0.2, progress=False, dtype="float32",
    )  # fmt: skip
    assert store.d_models == [48, 32] and store.d_model == 48
    assert float(store.read_acts()[:, 1, 32:].abs().max()) == 0.0
    cfg = CrossCoderConfig(d_models=store_widths(store), d_sae=96, k=4)
    cc = train_crosscoder(store, cfg, steps=120, batch_size=64, lr=3e-3, seed=0)
    assert float(padding_values(cc).abs().max()) == 0.0
    torch.testing.assert_close(cc.scaling_factors, store.scaling_factors.float())

    cc.save(tmp_path / "cc")
    loaded = CrossCoder.load(tmp_path / "cc")
    assert float(padding_values(loaded).abs().max()) == 0.0
    assert json.loads((tmp_path / "cc" / "cfg.json").read_text())["d_models"] == [48, 32]

    heldout = store.part("heldout").read_acts().float()
    ev = evaluate_crosscoder(loaded, heldout)
    want = direct_fve(loaded, heldout, (48, 32))
    assert ev["fve_per_model"] == pytest.approx(want, abs=1e-9)
    assert min(want) > 0.3  # it learned something in both spaces
    on_store = evaluate_crosscoder(loaded, store)
    assert on_store["evaluated_on"] == "heldout"
    assert on_store["fve_per_model"] == pytest.approx(want, abs=1e-6)

    diff = diff_features(loaded, store, show_progress=False)
    rec = diff.summary["reconstruction"]
    assert list(rec["fve_per_model"].values()) == pytest.approx(want, abs=1e-6)
    n = len(heldout)
    with torch.no_grad():
        recon = loaded.decode(loaded.encode(heldout))
    sse_moe = float((recon[:, 1, :32] - heldout[:, 1, :32]).double().pow(2).sum())
    assert list(rec["mse_per_model"].values())[1] == pytest.approx(sse_moe / (n * 32), rel=1e-5)
    r = diff.table["relative_norm"].to_numpy()
    norms = loaded.decoder_norms()
    torch.testing.assert_close(
        torch.tensor(r, dtype=torch.float32), norms[:, 1] / norms.sum(-1), equal_nan=True
    )
    paths = write_report(diff, tmp_path / "report", quiet=True)
    assert paths["json"].exists() and paths["html"].exists()
    with pytest.raises(CrossdiffError, match="cannot share one basis"):
        diff_features(loaded, store, same_basis=True, show_progress=False)
    assert crossdiff.CrossCoderConfig is CrossCoderConfig


def test_train_crosscoder_command_reads_the_store_widths(tmp_path, monkeypatch):
    """`crossdiff train-crosscoder` on a store of widths 48 and 32 trains a padded crosscoder."""
    acts, _ = planted_crosscoder_data(1024, 48, 6, 3, 3, densities=(0.1, 0.3), seed=0,
                                      d_models=(48, 32))  # fmt: skip
    monkeypatch.setattr(commands, "_open_store", lambda p: InMemoryStore(acts, d_models=(48, 32)))
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cc"
    args = parser.parse_args(
        ["train-crosscoder", "--store", "s", "--out", str(out), "--d-sae", "24", "--k", "2",
         "--steps", "20", "--batch-size", "64", "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    cc = CrossCoder.load(out)
    assert cc.cfg.widths == (48, 32) and cc.padding_max_abs() == 0.0
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["d_models"] == [48, 32]


@pytest.mark.slow
def test_readme_widths_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's two-width block, run as written with tiny models of d_model 48 and 32."""
    import re
    from pathlib import Path
    from types import SimpleNamespace

    from crossdiff.activations import load_pairing

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("Models of different widths") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # the one size knob, as tests/test_docs_blocks.py turns its blocks to the micro size: the
    # default 3,000 steps of 1,024 tokens take minutes on a CPU and test nothing more
    size = "train_crosscoder(store, cfg, steps=400, batch_size=256)"
    assert "train_crosscoder(store, cfg)" in code
    code = code.replace("train_crosscoder(store, cfg)", size)
    monkeypatch.chdir(tmp_path)
    namespace = {
        "crossdiff": crossdiff,
        "harvest": harvest,
        "load_pairing": load_pairing,
        "dense_48": tiny_model(seed=0, d_model=48),
        "moe_32": tiny_model(seed=1, d_model=32, moe=True),
        "data": SimpleNamespace(train=tiny_token_set(n_seq=300, seq_len=16)),
    }
    exec(compile(code, "README.md", "exec"), namespace)
    store, cc = namespace["store"], namespace["cc"]
    assert store.d_models == [48, 32]
    assert tuple(cc.cfg.d_models) == (48, 32) and cc.padding_max_abs() == 0.0
    result = crossdiff.evaluate_crosscoder(cc, store)
    assert all(v > 0 for v in result["fve_per_model"])  # better than each model's mean
