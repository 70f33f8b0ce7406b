"""ActivationStore on planted data: batches, shuffling, statistics, corruption, and folding."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from planted_store import write_planted_store

from crossdiff.activations import ActivationStore
from crossdiff.activations.store import StoreWriter
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.plumbing.common import CrossdiffError

WIDTHS = [4, 6]


def make_store(
    path, n: int = 100, shard: int = 30, seed: int = 0
) -> tuple[ActivationStore, torch.Tensor]:
    """A float32 store whose model-0 coordinate 0 holds each token's store index."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.zeros(n, 2, max(WIDTHS))
    acts[:, 0, :4] = torch.randn(n, 4, generator=g) * 3.0 + 1.0
    acts[:, 1, :6] = torch.randn(n, 6, generator=g) * 0.5
    acts[:, 0, 0] = torch.arange(n, dtype=torch.float32)
    return write_planted_store(path, acts, shard=shard, d_models=WIDTHS), acts


def indices(batch: torch.Tensor, store: ActivationStore) -> list[int]:
    return (batch[:, 0, 0] / store.scaling_factors[0]).round().long().tolist()


def test_read_acts_and_metadata_across_shard_boundaries(tmp_path):
    store, acts = make_store(tmp_path / "s")
    assert store.n_tokens == 100 and store.n_shards == 4
    assert torch.equal(store.read_acts(25, 65), acts[25:65])
    assert store.read_metadata(25, 65)["token_ids"].tolist() == list(range(25, 65))
    assert store.read_acts(40, 40).shape == (0, 2, 6)
    with pytest.raises(CrossdiffError, match="outside"):
        store.read_acts(90, 101)


def test_statistics_equal_the_planted_data(tmp_path):
    store, acts = make_store(tmp_path / "s")
    stats = store.statistics()
    for m, width in enumerate(WIDTHS):
        x = acts[:, m, :width].double()
        torch.testing.assert_close(stats["mean"][m, :width], x.mean(0))
        torch.testing.assert_close(stats["std"][m, :width], x.std(0, unbiased=False))
        torch.testing.assert_close(stats["mean_norm"][m], x.norm(dim=-1).mean())
        expected = width**0.5 / x.norm(dim=-1).mean().item()
        assert store.scaling_factors[m].item() == pytest.approx(expected, rel=1e-6)
    normalized = store.read_acts(normalize=True)
    for m, width in enumerate(WIDTHS):
        mean_norm = normalized[:, m].norm(dim=-1).mean().item()
        assert mean_norm == pytest.approx(width**0.5, rel=1e-5)


def test_same_seed_same_batches_and_every_batch_full(tmp_path):
    store, _ = make_store(tmp_path / "s")
    kwargs = dict(seed=3, shuffle_buffer=40, chunk_tokens=8)
    first = [b for _, b in zip(range(12), store.iter_batches(16, **kwargs), strict=False)]
    second_reader = ActivationStore(tmp_path / "s")
    second = [b for _, b in zip(range(12), second_reader.iter_batches(16, **kwargs), strict=False)]
    assert all(b.shape == (16, 2, 6) and b.dtype == torch.float32 for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = next(store.iter_batches(16, seed=4, shuffle_buffer=40, chunk_tokens=8))
    assert not torch.equal(other, first[0])
    # 12 batches of 16 = 192 tokens: the loop wrapped past the 100-token store with full batches
    seen = [i for b in first for i in indices(b, store)]
    assert len(seen) == 192 and set(seen) == set(range(100))


def test_one_pass_visits_each_token_at_most_once_and_is_shuffled(tmp_path):
    store, _ = make_store(tmp_path / "s")
    batches = list(store.iter_batches(16, loop=False, seed=0, shuffle_buffer=40, chunk_tokens=8))
    assert len(batches) == 6  # 100 // 16: the last partial batch is dropped
    seen = [i for b in batches for i in indices(b, store)]
    assert len(set(seen)) == 96 and set(seen) <= set(range(100))
    assert seen != sorted(seen)


def test_unshuffled_pass_is_store_order_without_normalization(tmp_path):
    store, acts = make_store(tmp_path / "s")
    batches = list(store.iter_batches(25, shuffle=False, normalize=False, loop=False))
    assert len(batches) == 4
    assert torch.equal(torch.cat(batches), acts)


def test_batch_arguments_are_checked(tmp_path):
    store, _ = make_store(tmp_path / "s")
    with pytest.raises(CrossdiffError, match="larger than the store"):
        next(store.iter_batches(101, loop=False))
    with pytest.raises(CrossdiffError, match="positive"):
        next(store.iter_batches(0))
    half = next(store.iter_batches(8, dtype=torch.float16))
    assert half.dtype == torch.float16 and half.shape == (8, 2, 6)


def test_corrupted_shard_names_the_shard(tmp_path):
    make_store(tmp_path / "s")
    shard = tmp_path / "s" / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = ActivationStore(tmp_path / "s")
    assert torch.equal(store.read_acts(0, 10), store.read_acts(0, 10))  # other shards still read
    with pytest.raises(CrossdiffError, match=r"shard_00002.*corrupted.*checksum.*harvest again"):
        store.read_acts(55, 65)
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(CrossdiffError, match=r"shard_00002.*corrupted.*bytes"):
        ActivationStore(tmp_path / "s").verify()


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(CrossdiffError, match="no activation store"):
        ActivationStore(tmp_path / "nothing")


def test_orphans_are_removed_when_reopened(tmp_path):
    make_store(tmp_path / "s")
    (tmp_path / "s" / "shard_00004.safetensors").write_bytes(b"partial")
    (tmp_path / "s" / ".shard_00005.safetensors.abc.tmp").write_bytes(b"partial")
    writer = StoreWriter.reopen(tmp_path / "s")
    assert writer.n_tokens == 100
    assert not (tmp_path / "s" / "shard_00004.safetensors").exists()
    assert not (tmp_path / "s" / ".shard_00005.safetensors.abc.tmp").exists()


class FoldedWeights(NamedTuple):
    W_enc: torch.Tensor
    b_enc: torch.Tensor | None
    W_dec: torch.Tensor
    b_dec: torch.Tensor


def fold_scaling_factors(W_enc, b_enc, W_dec, b_dec, s) -> FoldedWeights:
    """The weights folded by the crosscoder's own fold (CrossCoder.fold_scaling_factors)."""
    n_models, d, d_sae = W_enc.shape
    cc = CrossCoder(CrossCoderConfig(n_models=n_models, d_model=d, d_sae=d_sae, k=3))
    with torch.no_grad():
        cc.W_enc.copy_(W_enc)
        cc.b_enc.copy_(b_enc)
        cc.W_dec_untied.copy_(W_dec)
        cc.b_dec.copy_(b_dec)
    cc.fold_scaling_factors(s)
    return FoldedWeights(cc.W_enc.detach(), cc.b_enc.detach(), cc.W_dec.detach(), cc.b_dec.detach())


def test_folded_crosscoder_on_raw_acts_equals_scaled_one():
    g = torch.Generator().manual_seed(0)
    n_models, d, d_sae = 2, 6, 12
    W_enc = torch.randn(n_models, d, d_sae, generator=g)
    b_enc = torch.randn(d_sae, generator=g)
    W_dec = torch.randn(d_sae, n_models, d, generator=g)
    b_dec = torch.randn(n_models, d, generator=g)
    s = torch.tensor([0.25, 3.0])
    x = torch.randn(5, n_models, d, generator=g) * 4

    def crosscoder(x, W_enc, b_enc, W_dec, b_dec):
        pre = torch.einsum("bmd,mdh->bh", x - b_dec, W_enc) + b_enc
        f = torch.relu(pre) * (pre >= pre.topk(3, dim=-1).values[:, -1:])  # top-3
        return f, torch.einsum("bh,hmd->bmd", f, W_dec) + b_dec

    f_scaled, recon_scaled = crosscoder(x * s[:, None], W_enc, b_enc, W_dec, b_dec)
    folded = fold_scaling_factors(W_enc, b_enc, W_dec, b_dec, s)
    f_raw, recon_raw = crosscoder(x, *folded)
    torch.testing.assert_close(f_raw, f_scaled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recon_raw, recon_scaled / s[:, None], rtol=1e-4, atol=1e-4)
    forgot_bias = folded._replace(b_dec=b_dec)
    assert not torch.allclose(crosscoder(x, *forgot_bias)[1], recon_raw, atol=1e-2)
    with pytest.raises(CrossdiffError, match="positive"):
        fold_scaling_factors(W_enc, b_enc, W_dec, b_dec, torch.tensor([1.0, 0.0]))
