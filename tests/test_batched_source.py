"""The one iter_batches every source shares (activations.source.ActivationSource): its checks name
the source, `skip` leaves out exactly the first batches, and an in-memory pass keeps its tail."""

from __future__ import annotations

import pytest
import torch

from crossdiff.crosscoder.synthetic import InMemoryStore
from crossdiff.plumbing.common import CrossdiffError


def test_skip_leaves_out_exactly_the_first_batches():
    store = InMemoryStore(torch.randn(40, 2, 4, generator=torch.Generator().manual_seed(0)))
    whole = list(store.iter_batches(8, seed=3, loop=False))
    skipped = list(store.iter_batches(8, seed=3, loop=False, skip=2))
    assert len(whole) == 5 and len(skipped) == 3
    for a, b in zip(whole[2:], skipped, strict=True):
        torch.testing.assert_close(a, b)


def test_one_in_memory_pass_keeps_the_partial_batch_and_scales_it():
    acts = torch.randn(20, 2, 4, generator=torch.Generator().manual_seed(1))
    store = InMemoryStore(acts)
    batches = list(store.iter_batches(8, shuffle=False, loop=False))
    assert [len(b) for b in batches] == [8, 8, 4]
    torch.testing.assert_close(torch.cat(batches), acts * store.scaling_factors[:, None])


def test_an_empty_source_says_what_it_is_and_what_to_do():
    with pytest.raises(CrossdiffError, match="InMemoryStore has no tokens; pass a tensor"):
        next(InMemoryStore(torch.zeros(0, 2, 4)).iter_batches(4))
    with pytest.raises(CrossdiffError, match="positive"):
        next(InMemoryStore(torch.ones(4, 2, 4)).iter_batches(0))
