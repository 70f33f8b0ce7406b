"""The ActivationSource contract: a store, its parts, a live source and an in-memory store all
implement it, and a live source reads (acts and metadata) as the store's training part does."""

from __future__ import annotations

import pytest
import torch
from test_harvest import tiny_model
from test_heldout import packed_token_set

from crossdiff.activations import harvest
from crossdiff.activations.live import LiveActivations
from crossdiff.activations.source import ActivationSource
from crossdiff.analysis.source import TokenSource
from crossdiff.crosscoder.synthetic import InMemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
KW = dict(batch_size=4, shard_tokens=40, heldout_fraction=0.25, split_seed=3, dtype="float16")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = (tiny_model(seed=0), tiny_model(seed=1, moe=True))
    tokens = packed_token_set(n_seq=16)
    store = harvest(*models, tokens, "paper", tmp_path_factory.mktemp("s"), progress=False, **KW)
    live = LiveActivations(*models, tokens, "paper", scale_tokens=None, **KW)
    return store, live


def test_every_source_implements_the_protocol(setup):
    store, live = setup
    memory = InMemoryStore(torch.randn(10, 2, 4))
    for source in (store, store.part("train"), store.part("heldout"), live, memory):
        assert isinstance(source, ActivationSource), type(source).__name__
        assert TokenSource(source).n_tokens == source.n_tokens
    assert not isinstance(torch.zeros(3), ActivationSource)


def test_a_live_source_reads_as_the_stores_training_part(setup):
    store, live = setup
    train = store.part("train")
    assert live.n_tokens == train.n_tokens and list(live.domain_names) == train.domain_names
    lo, hi = 3, train.n_tokens - 2
    assert torch.equal(live.read_acts(lo, hi), train.read_acts(lo, hi))
    assert torch.equal(live.read_acts(lo, hi, normalize=True), train.read_acts(lo, hi, True))
    want = train.read_metadata(lo, hi)
    got = live.read_metadata(lo, hi)
    assert set(got) == set(want) - {"experts"}
    for key, values in got.items():
        assert torch.equal(values, want[key]), key


def test_checking_the_type_of_a_live_source_does_not_run_the_models():
    # beartype checks isinstance on every function typed with ActivationSource; a structural
    # protocol would read `scaling_factors`, which runs the pair on a live source's first shards
    models = (tiny_model(seed=0), tiny_model(seed=1, moe=True))
    live = LiveActivations(*models, packed_token_set(n_seq=16), "paper", scale_tokens=None, **KW)
    assert isinstance(live, ActivationSource)
    assert live._scaling is None


def test_a_source_without_its_reads_cannot_be_made():
    class BatchesOnly(InMemoryStore):
        read_metadata = ActivationSource.read_metadata  # abstract again

    with pytest.raises(TypeError, match="read_metadata"):
        BatchesOnly(torch.randn(4, 2, 3))
