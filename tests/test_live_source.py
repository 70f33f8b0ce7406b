"""The live activation source: the training part of the store harvest would write, computed from
the models on demand. Same rows in the same order as the store, a crosscoder within 1e-5 of
the store path's, resumable to the same result, held-out documents never fed to training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_harvest import tiny_model
from test_heldout import packed_token_set

from crossdiff.activations import RunningStats, harvest
from crossdiff.activations.live import LiveActivations
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
from crossdiff.crosscoder.checkpoint import read_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
# small shards and chunks, so the shuffle crosses shards and chunks many times
KW = dict(batch_size=4, shard_tokens=40, heldout_fraction=0.25, split_seed=3, dtype="float16")
LIVE = dict(scale_tokens=None)  # scaling factors from all training tokens, as the store's
CC = dict(steps=12, batch_size=32, lr=1e-3, log_every=4, prefetch=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = (tiny_model(seed=0), tiny_model(seed=1, moe=True))
    tokens = packed_token_set(n_seq=40)
    store = harvest(*models, tokens, "paper", tmp_path_factory.mktemp("s"), progress=False, **KW)
    return models, tokens, store


def live_source(setup, **kw) -> LiveActivations:
    models, tokens, _ = setup
    return LiveActivations(*models, tokens, "paper", **(KW | LIVE | kw))


def cfg() -> CrossCoderConfig:
    return CrossCoderConfig(n_models=2, d_model=16, d_sae=32, k=4)


def test_live_batches_equal_the_stores_row_for_row(setup):
    _, _, store = setup
    live = live_source(setup)
    train = store.part("train")
    assert live.n_tokens == train.n_tokens and live.n_shards == store.n_shards > 3
    assert torch.equal(live.scaling_factors, train.scaling_factors)
    kw = dict(seed=5, shuffle=True, loop=True, chunk_tokens=16, shuffle_buffer=48)
    got = [b for _, b in zip(range(20), live.iter_batches(16, **kw), strict=False)]
    want = [b for _, b in zip(range(20), train.iter_batches(16, **kw), strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # one pass, no shuffle: the training part in store order, every training token once
    ordered = torch.cat(list(live.iter_batches(1, shuffle=False, loop=False, normalize=False)))
    assert torch.equal(ordered, train.read_acts())
    assert live.shards_computed == live.n_shards  # everything fit the cache: computed once


def test_scaling_factors_come_from_a_first_slice_of_whole_shards(setup):
    _, _, store = setup
    live = live_source(setup, scale_tokens=50)
    per_shard = [sum(hi - lo for lo, hi in pieces) for pieces in live._pieces]
    n_shards = next(i + 1 for i in range(len(per_shard)) if sum(per_shard[: i + 1]) >= 50)
    stats = RunningStats(live.d_models)
    stats.update(store.part("train").read_acts(0, sum(per_shard[:n_shards])))
    factors = live.scaling_factors
    assert torch.allclose(factors, stats.scaling_factors().float(), rtol=1e-6, atol=0)
    assert live.shards_computed == n_shards < live.n_shards  # only the slice ran the models
    assert not torch.equal(factors, store.scaling_factors)


def test_heldout_documents_are_never_fed_to_training(setup):
    _, _, store = setup
    live = live_source(setup)
    heldout_docs = set(store.part("heldout").read_metadata()["doc_ids"].tolist())
    assert heldout_docs and live.heldout.sum() == store.parts["heldout"]
    seen = torch.cat(
        [rows for _, rows in zip(range(50), _index_stream(live), strict=False)]
    ).unique()
    kept_docs = live.job.rows.doc_ids[live.job.rows.keep][: live.total_tokens]
    fed = set(kept_docs[seen].tolist())
    assert not fed & heldout_docs and not live.heldout[seen].any()
    assert len(seen) == live.n_tokens  # 50 batches of 32 (7 passes) cover every training token


def _index_stream(live: LiveActivations):
    """The token indices the trainer's batches are made of (captured from gather)."""
    captured = []
    original = live.gather

    def spy(rows, part=None):
        captured.append(rows.clone())
        return original(rows, part)

    live.gather = spy
    for _ in live.iter_batches(32, seed=0, shuffle_buffer=64, chunk_tokens=16):
        yield captured.pop()


def test_crosscoder_from_live_equals_the_store_path(setup):
    _, _, store = setup
    a = train_crosscoder(store, cfg(), seed=2, **CC)
    b = train_crosscoder(live_source(setup), cfg(), seed=2, **CC)
    for name, tensor in a.state_dict().items():
        assert torch.allclose(tensor, b.state_dict()[name], atol=1e-5, rtol=0), name
    assert b.training_summary["trained_on"] == "train"
    assert a.training_summary["scaling_factors"] == b.training_summary["scaling_factors"]


class Interrupted(Exception):
    pass


def test_a_resumed_live_run_equals_an_uninterrupted_one(setup, tmp_path):
    whole = train_crosscoder(live_source(setup), cfg(), seed=2, **CC)
    ckpt = tmp_path / "ckpt"
    # interrupted: the data stops during step 10 (the sample that sets b_dec is one more
    # gather); the last checkpoint is the one after step 8
    broken = live_source(setup)
    original, calls = broken.gather, []

    def stops(rows, part=None):
        calls.append(1)
        if len(calls) > 1 + 9:
            raise Interrupted
        return original(rows, part)

    broken.gather = stops
    with pytest.raises(Interrupted):
        train_crosscoder(broken, cfg(), seed=2, **CC, checkpoint_dir=ckpt, checkpoint_every=4)
    state, _ = read_checkpoint(ckpt)
    assert state["live"] == {"shuffle_seed": 2, "tokens_per_step": 32}
    resumed_live = live_source(setup)
    resumed = train_crosscoder(resumed_live, cfg(), seed=2, **CC, checkpoint_dir=ckpt)
    assert resumed.training_summary["resumed_from_step"] == 8
    for name, tensor in whole.state_dict().items():
        assert torch.allclose(tensor, resumed.state_dict()[name], atol=1e-6, rtol=0), name
    # the skipped steps ran no model: only the shards of the sample and the last 4 steps
    assert resumed_live.shards_computed == resumed_live.n_shards


# --- `crossdiff run --activations live` ---------------------------------------------------------


@pytest.mark.slow
def test_run_micro_live_equals_the_store_path(tmp_path):
    from crossdiff.cli import main
    from crossdiff.crosscoder import CrossCoder

    store_run = tmp_path / "store"
    assert main(["run", "--preset", "micro", "--out", str(store_run), "--device", "cpu",
                 "--activations", "store", "--splice-sequences", "0"]) == 0  # fmt: skip
    live_run = tmp_path / "live"
    shutil.copytree(store_run, live_run)  # the same data and models: those stages are reused
    assert main(["run", "--preset", "micro", "--out", str(live_run), "--device", "cpu",
                 "--activations", "live", "--splice-sequences", "0"]) == 0  # fmt: skip
    a, b = CrossCoder.load(store_run / "crosscoder"), CrossCoder.load(live_run / "crosscoder")
    sa, sb = a.state_dict(), b.state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}
    worst = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())
    assert worst <= 1e-5, worst
    record = json.loads((live_run / "store" / "stage.json").read_text())
    assert record["options"]["activations"] == "live"
    report = json.loads((live_run / "report" / "report.json").read_text())
    assert report["summary"]  # the report read the small store's held-out part


def test_default_activations_follow_the_disk_estimate(tmp_path, monkeypatch, capsys):
    import shutil as shutil_module

    from crossdiff.run.pipeline import choose_activations, resolve_options

    options = resolve_options("paper")
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _: usage._replace(free=64 * 2**30))
    assert choose_activations(options, tmp_path, None, verbose=True) == "live"
    assert "does not fit" in capsys.readouterr().out
    assert choose_activations(resolve_options("micro"), tmp_path, None, verbose=False) == "store"
    assert choose_activations(options, tmp_path, "store", verbose=False) == "store"


@pytest.mark.slow
def test_two_ranks_split_the_model_work_and_train_the_store_paths_crosscoder(tmp_path):
    from safetensors.torch import load_file
    from test_distributed_training import launch

    launch("train_live.py", tmp_path / "one", 10, nproc=1)
    launch("train_live.py", tmp_path / "two", 10, nproc=2)

    def weights(run: str, name: str, rank: int = 0) -> dict:
        return load_file(tmp_path / run / f"{name}_rank_{rank}.safetensors")

    live, store = weights("two", "live"), weights("two", "store")
    for key, value in live.items():
        assert torch.equal(value, weights("two", "live", rank=1)[key]), key
        torch.testing.assert_close(value, store[key], atol=1e-6, rtol=0, msg=key)
    # against one process, live and store differ from their 1-process runs alike: the 2-rank
    # trainer's own difference, not the source's
    one_live, one_store = weights("one", "live"), weights("one", "store")
    for key, value in one_live.items():
        if not value.numel():
            continue
        torch.testing.assert_close(value, one_store[key], atol=1e-6, rtol=0, msg=key)
        gap_live = (live[key] - value).abs().max()
        gap_store = (store[key] - one_store[key]).abs().max()
        torch.testing.assert_close(gap_live, gap_store, atol=1e-6, rtol=0, msg=key)
    counts = json.loads((tmp_path / "two" / "rank_1.json").read_text())
    assert counts["shards_computed"] == counts["n_shards"]  # each shard once, shared by the ranks
