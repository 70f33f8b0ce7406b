"""The store's held-out part: whole documents chosen by seed and fraction, recorded in the
manifest, never read by crosscoder training, and read by evaluation and the feature diff by
default; the pooled FVE in each model's normalized units."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
from test_harvest import D_VOCAB, tiny_model

import crossdiff.crosscoder as crosscoder_module
from crossdiff.activations import ActivationStore, harvest
from crossdiff.activations.harvest import heldout_documents
from crossdiff.activations.store import evaluation_part
from crossdiff.analysis import diff_features
from crossdiff.crosscoder import CrossCoderConfig, evaluate_crosscoder, train_crosscoder
from crossdiff.crosscoder.synthetic import planted_crosscoder_data
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
KW = dict(batch_size=4, shard_tokens=40, progress=False, dtype="float32")


def packed_token_set(n_seq: int = 24, seq_len: int = 9, seed: int = 0) -> TokenSet:
    """Rows as pack_documents makes them: documents of 3 to 20 tokens run across rows (with BOS
    in column 0), then the rows are shuffled, so a document's tokens are scattered."""
    g = torch.Generator().manual_seed(seed)
    width = seq_len - 1
    n_body = n_seq * width
    lengths = torch.randint(3, 21, (n_body,), generator=g)
    doc_of = torch.repeat_interleave(torch.arange(n_body), lengths)[:n_body]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    positions = torch.arange(n_body) - starts[doc_of]
    body_ids = (1000 + doc_of).view(n_seq, width)
    body_pos = positions.view(n_seq, width)
    tokens = torch.randint(1, D_VOCAB, (n_seq, seq_len), generator=g)
    tokens[:, 0] = 0
    order = torch.randperm(n_seq, generator=g)
    return TokenSet(
        tokens=tokens[order],
        doc_ids=torch.cat([body_ids[:, :1], body_ids], 1)[order],
        doc_positions=torch.cat([torch.full((n_seq, 1), -1), body_pos], 1)[order],
        domains=(torch.arange(n_seq) % 3)[order],
    )


def pair() -> tuple:
    """Two models of the same width (a crosscoder needs equal widths)."""
    return tiny_model(seed=0), tiny_model(seed=1, moe=True)


def doc_sets(store: ActivationStore) -> tuple[set[int], set[int]]:
    """The documents of the training part and of the held-out part."""
    train = set(store.part("train").read_metadata()["doc_ids"].tolist())
    if not store.has_heldout:
        return train, set()
    return train, set(store.part("heldout").read_metadata()["doc_ids"].tolist())


# --- the split --------------------------------------------------------------------------------


def test_parts_hold_whole_documents_chosen_by_seed_and_recorded(tmp_path):
    ts = packed_token_set()
    models = pair()
    store = harvest(*models, ts, "paper", tmp_path / "a", heldout_fraction=0.25, split_seed=3, **KW)
    train_docs, heldout_docs = doc_sets(store)
    assert train_docs.isdisjoint(heldout_docs)  # no document straddles the parts
    all_docs = set(store.read_metadata()["doc_ids"].tolist())
    assert train_docs | heldout_docs == all_docs
    keep = torch.ones_like(ts.tokens, dtype=torch.bool)
    keep[:, 0] = False
    chosen = heldout_documents(ts.doc_ids, keep, 0.25, 3)
    n_docs = len(torch.unique(ts.doc_ids[keep]))
    assert len(chosen) == round(0.25 * n_docs) and heldout_docs == set(chosen.tolist())

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["split"] == {"unit": "document", "heldout_fraction": 0.25, "seed": 3}
    segment = manifest["segments"][0]
    assert (segment["documents"], segment["heldout_documents"]) == (n_docs, len(chosen))
    meta = store.read_metadata()
    in_heldout = torch.isin(meta["doc_ids"], chosen)
    assert manifest["parts"] == {
        "train": int((~in_heldout).sum()),
        "heldout": int(in_heldout.sum()),
    }
    assert manifest["parts"]["heldout"] > 0 and store.n_tokens == store.total_tokens
    # the ranges in the shards mark exactly the held-out documents' rows
    marked = torch.zeros(store.n_tokens, dtype=torch.bool)
    for shard in manifest["shards"]:
        for lo, hi in shard["heldout"]:
            marked[shard["start"] + lo : shard["start"] + hi] = True
    assert torch.equal(marked, in_heldout)
    # each part reads its rows, in store order, with the store's interface
    acts = store.read_acts()
    torch.testing.assert_close(store.part("heldout").read_acts(), acts[in_heldout])
    torch.testing.assert_close(store.part("train").read_acts(), acts[~in_heldout])
    torch.testing.assert_close(store.part("heldout").read_acts(3, 9), acts[in_heldout][3:9])
    part = store.part("heldout")
    batches = list(part.iter_batches(5, seed=1, normalize=False, loop=False, chunk_tokens=7))
    got = torch.cat(batches)
    assert len(got) == part.n_tokens // 5 * 5
    want = {tuple(row.flatten().tolist()) for row in acts[in_heldout]}
    assert {tuple(row.flatten().tolist()) for row in got} <= want
    # statistics (and so the scaling factors) come from the training part only
    train_norm = acts[~in_heldout][:, 0, :16].double().norm(dim=-1).mean()
    torch.testing.assert_close(store.statistics()["mean_norm"][0], train_norm)

    # deterministic: the same seed gives the same parts, another seed other documents
    again = harvest(*models, ts, "paper", tmp_path / "b", heldout_fraction=0.25, split_seed=3, **KW)
    other = harvest(*models, ts, "paper", tmp_path / "c", heldout_fraction=0.25, split_seed=4, **KW)
    assert again.manifest["shards"] == store.manifest["shards"]
    assert doc_sets(again) == (train_docs, heldout_docs)
    assert doc_sets(other)[1] != heldout_docs


def test_an_extended_harvest_keeps_the_split_of_a_full_one(tmp_path):
    ts = packed_token_set()
    models = pair()
    full = harvest(*models, ts, "paper", tmp_path / "full", **KW)
    harvest(*models, ts, "paper", tmp_path / "grown", n_tokens=70, **KW)
    grown = harvest(*models, ts, "paper", tmp_path / "grown", **KW)
    assert grown.parts == full.parts and grown.parts["heldout"] > 0
    torch.testing.assert_close(grown.part("heldout").read_acts(), full.part("heldout").read_acts())


def test_two_ranks_split_the_documents_as_one_process(tmp_path):
    from test_distributed_harvest import assert_ok, assert_same_store, run_ranks

    ts = packed_token_set()
    models = pair()
    opts = dict(KW, batch_size=3, shard_tokens=10, heldout_fraction=0.25, split_seed=5)
    single = harvest(*models, ts, "paper", tmp_path / "single", **opts)

    def job(rank: int) -> None:
        harvest(*models, ts, "paper", tmp_path / "two", **opts)

    assert_ok(run_ranks(2, job, tmp_path / "logs"))
    merged = ActivationStore(tmp_path / "two")
    assert_same_store(merged, single)  # parts and statistics (training part) included
    assert merged.parts["heldout"] > 0 and merged.manifest["distributed"]["world_size"] == 2
    assert torch.equal(merged.part("heldout").read_acts(), single.part("heldout").read_acts())
    for rank in (0, 1):  # each rank's own store marks its held-out rows too
        sub = ActivationStore(tmp_path / "two" / "ranks-of-2" / f"rank_{rank}")
        assert doc_sets(sub)[1] <= doc_sets(single)[1]
        assert doc_sets(sub)[0].isdisjoint(doc_sets(single)[1])


def test_no_heldout_fraction_and_old_stores_evaluate_on_training_tokens(tmp_path):
    ts = packed_token_set()
    store = harvest(*pair(), ts, "paper", tmp_path / "s", heldout_fraction=0.0, **KW)
    assert store.parts == {"train": store.n_tokens, "heldout": 0} and not store.has_heldout
    with pytest.raises(CrossdiffError, match="no held-out tokens"):
        store.part("heldout")
    with pytest.warns(UserWarning, match="evaluating on training tokens"):
        view, label = evaluation_part(store)
    assert label == "train" and view.n_tokens == store.n_tokens
    # a store written before parts existed: no split, no ranges; all of it is training
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for key in ("split", "parts"):
        manifest.pop(key)
    for shard in manifest["shards"]:
        shard.pop("heldout")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    old = ActivationStore(tmp_path / "s")
    assert old.part("train").n_tokens == old.n_tokens and old.parts["heldout"] == 0
    with pytest.raises(CrossdiffError, match="before stores had a held-out part"):
        old.part("heldout")
    with pytest.raises(CrossdiffError, match="heldout_fraction must be in"):
        harvest(*pair(), packed_token_set(), "paper", tmp_path / "x", heldout_fraction=0.7, **KW)


# --- training never reads the held-out part; evaluation reads it ---------------------------------


class ReadLog:
    """Records every slice read from a store's shards: (shard index, key, lo, hi)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[int, str, int, int]] = []
        original = ActivationStore._shard
        log = self

        class Slice:
            def __init__(self, inner, index: int, key: str) -> None:
                self.inner, self.index, self.key = inner, index, key

            def __getitem__(self, item: slice):
                lo, hi, _ = item.indices(self.inner.get_shape()[0])
                log.reads.append((self.index, self.key, lo, hi))
                return self.inner[item]

        class Handle:
            def __init__(self, inner, index: int) -> None:
                self.inner, self.index = inner, index

            def get_slice(self, key: str) -> Slice:
                return Slice(self.inner.get_slice(key), self.index, key)

        def shard(store: ActivationStore, index: int) -> Handle:
            return Handle(original(store, index), index)

        monkeypatch.setattr(ActivationStore, "_shard", shard)

    def heldout_rows_read(self, manifest: dict) -> int:
        count = 0
        for index, key, lo, hi in self.reads:
            if key != "acts":
                continue
            for h_lo, h_hi in manifest["shards"][index].get("heldout", []):
                count += max(0, min(hi, h_hi) - max(lo, h_lo))
        return count


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> ActivationStore:
    root = tmp_path_factory.mktemp("heldout")
    ts = packed_token_set(n_seq=48)
    return harvest(*pair(), ts, "paper", root / "store", heldout_fraction=0.2, **KW)


def test_training_never_reads_a_heldout_row_and_evaluation_does(small_store, tmp_path, monkeypatch):
    store = ActivationStore(small_store.path)
    assert store.parts["heldout"] >= 30
    log = ReadLog(monkeypatch)
    cfg = CrossCoderConfig(d_model=16, d_sae=32, k=4)
    opts = dict(steps=12, batch_size=32, checkpoint_dir=tmp_path, checkpoint_every=6, prefetch=2)
    cc = train_crosscoder(store, cfg, **opts)
    resumed = train_crosscoder(store, cfg, **opts)  # the resume path reads the store again
    assert resumed.training_summary["resumed_from_step"] == 12
    acts_reads = [r for r in log.reads if r[1] == "acts"]
    assert sum(hi - lo for _, _, lo, hi in acts_reads) >= 12 * 32
    assert log.heldout_rows_read(store.manifest) == 0
    summary = cc.training_summary
    assert (summary["trained_on"], summary["n_train_tokens"]) == ("train", store.parts["train"])
    with pytest.raises(CrossdiffError, match="refusing to train on the held-out part"):
        train_crosscoder(store.part("heldout"), cfg, steps=2, batch_size=8)

    # the instrument sees held-out reads when there are some: evaluation reads only those
    log.reads.clear()
    metrics = evaluate_crosscoder(cc, store)
    assert metrics["evaluated_on"] == "heldout" and metrics["n_tokens"] == store.parts["heldout"]
    assert log.heldout_rows_read(store.manifest) == metrics["n_tokens"]
    assert sum(hi - lo for _, key, lo, hi in log.reads if key == "acts") == metrics["n_tokens"]


def test_evaluate_and_diff_default_to_heldout_and_say_so(small_store):
    store = small_store
    cc = train_crosscoder(store, CrossCoderConfig(d_model=16, d_sae=32, k=4), steps=20,
                          batch_size=32, prefetch=0)  # fmt: skip
    parts = store.parts
    on_heldout = evaluate_crosscoder(cc, store, batch_size=16)
    on_train = evaluate_crosscoder(cc, store, batch_size=16, part="train")
    assert (on_heldout["evaluated_on"], on_heldout["n_tokens"]) == ("heldout", parts["heldout"])
    assert (on_train["evaluated_on"], on_train["n_tokens"]) == ("train", parts["train"])
    given_view = evaluate_crosscoder(cc, store.part("train"), batch_size=16)  # a view as it is
    assert given_view["evaluated_on"] == "train" and given_view["fve"] == on_train["fve"]
    assert on_heldout["fve"] != pytest.approx(on_train["fve"], abs=1e-9)
    assert evaluate_crosscoder(cc, store.read_acts())["evaluated_on"] == "given"
    with pytest.raises(CrossdiffError, match="chooses a part of an ActivationStore"):
        evaluate_crosscoder(cc, store.read_acts(), part="heldout")

    diff = diff_features(cc, store, show_progress=False, batch_size=16, latent_scaling=False)
    rec = diff.summary["reconstruction"]
    assert diff.summary["evaluated_on"] == rec["evaluated_on"] == "heldout"
    assert diff.summary["n_tokens"] == parts["heldout"] == diff.config["n_tokens_available"]
    assert rec["fve"] == pytest.approx(on_heldout["fve"], rel=1e-4, abs=1e-5)
    assert rec["fve_pooled_normalized"] == pytest.approx(
        on_heldout["fve_pooled_normalized"], rel=1e-4, abs=1e-5
    )
    diff_train = diff_features(cc, store, show_progress=False, part="train", latent_scaling=False)
    assert diff_train.summary["n_tokens"] == parts["train"]
    assert diff_train.summary["evaluated_on"] == "train"


# --- pooled FVE in normalized units -------------------------------------------------------------


def test_pooled_normalized_fve_by_hand_on_models_of_very_different_scale():
    acts, _ = planted_crosscoder_data(3000, 16, 8, 4, 4, noise=0.05, scales=(1.0, 100.0), seed=0)
    g = torch.Generator().manual_seed(1)
    acts[:, 0] += 0.6 * torch.randn(acts[:, 0].shape, generator=g) / 4  # model 0 is noisier
    cc = train_crosscoder(acts, CrossCoderConfig(d_model=16, d_sae=48, k=6), steps=300,
                          batch_size=128, lr=3e-3, prefetch=0)  # fmt: skip
    metrics = evaluate_crosscoder(cc, acts)
    with torch.no_grad():
        x = acts.double()
        x_hat = cc.decode_dense(cc.encode_threshold(acts)).double()
    sse = (x_hat - x).pow(2).sum(dim=(0, 2))
    sst = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    s2 = torch.tensor(cc.cfg.metadata.crossdiff_training["scaling_factors"]).double() ** 2
    by_hand = float(1 - (sse * s2).sum() / (sst * s2).sum())
    assert metrics["fve_pooled_normalized"] == pytest.approx(by_hand, abs=1e-5)
    assert metrics["scaling_factors"] == pytest.approx(s2.sqrt().tolist())
    per_model = metrics["fve_per_model"]
    assert per_model[1] - per_model[0] > 0.2  # the small model is reconstructed worse
    # raw pooling is the large model's FVE; the normalized one weighs both models
    assert metrics["fve"] == pytest.approx(per_model[1], abs=1e-3)
    assert per_model[0] + 0.05 < metrics["fve_pooled_normalized"] < per_model[1] - 0.05
    diff = diff_features(cc, acts, show_progress=False, latent_scaling=False)
    assert diff.summary["reconstruction"]["fve_pooled_normalized"] == pytest.approx(
        by_hand, abs=1e-4
    )
    assert diff.summary["evaluated_on"] == "given"


# --- the pipeline ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_crossdiff_run_micro_trains_on_training_tokens_and_reports_heldout(
    tmp_path: Path, monkeypatch, capsys
):
    from crossdiff.cli import main

    log = ReadLog(monkeypatch)
    inside = {"training": False, "reads_before": 0, "reads_after": 0}
    train = crosscoder_module.train_crosscoder

    @functools.wraps(train)  # the run checks its options against train_crosscoder's signature
    def traced(*args, **kwargs):
        inside["reads_before"] = len(log.reads)
        try:
            return train(*args, **kwargs)
        finally:
            inside["reads_after"] = len(log.reads)

    monkeypatch.setattr(crosscoder_module, "train_crosscoder", traced)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        code = main(["run", "--preset", "micro", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert code == 0
    store = ActivationStore(tmp_path / "run" / "store")
    assert store.parts["heldout"] > 0 and store.manifest["split"]["heldout_fraction"] == 0.1
    training_reads = log.reads[inside["reads_before"] : inside["reads_after"]]
    assert sum(hi - lo for _, key, lo, hi in training_reads if key == "acts") >= 60 * 256
    log.reads = training_reads
    assert log.heldout_rows_read(store.manifest) == 0
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    rec = report["summary"]["reconstruction"]
    assert rec["evaluated_on"] == "heldout" and report["summary"]["evaluated_on"] == "heldout"
    assert report["summary"]["n_tokens"] == store.parts["heldout"]
    assert rec["fve_pooled_normalized"] is not None
    markdown = (tmp_path / "run" / "report" / "report.md").read_text()
    assert f"Measured on {store.parts['heldout']} held-out (never trained on) tokens" in markdown
    printed = capsys.readouterr().out
    assert f"FVE per model on {store.parts['heldout']} heldout tokens" in printed
    assert "pooled normalized" in printed
