"""The live activation source: the training part of the store harvest would write, computed from
the models on demand. Same rows in the same order as the store, a crosscoder within 1e-5 of
the store path's, resumable to the same result, held-out documents never fed to training."""

from __future__ import annotations

import pytest
import torch
from test_harvest import tiny_model
from test_heldout import packed_token_set

from crossdiff.activations import harvest
from crossdiff.activations.live import LiveActivations, store_bytes
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
from crossdiff.crosscoder.checkpoint import read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
# small shards and chunks, so the shuffle crosses shards and chunks many times
KW = dict(batch_size=4, shard_tokens=40, heldout_fraction=0.25, split_seed=3, dtype="float16")
CC = dict(steps=12, batch_size=32, lr=1e-3, log_every=4, prefetch=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = (tiny_model(seed=0), tiny_model(seed=1, moe=True))
    tokens = packed_token_set(n_seq=40)
    store = harvest(*models, tokens, "paper", tmp_path_factory.mktemp("s"), progress=False, **KW)
    return models, tokens, store


def live_source(setup, **kw) -> LiveActivations:
    models, tokens, _ = setup
    return LiveActivations(*models, tokens, "paper", **(KW | kw))


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


def test_store_bytes_estimate():
    assert store_bytes(1000, 2, 768, "bfloat16") == 1000 * 2 * 768 * 2
