"""Paired harvesting: exact activations and metadata, resume, append, and every error path."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import crossdiff.activations.store_writer as writer_module
from crossdiff.activations import ActivationStore, Pairing, harvest
from crossdiff.activations.store import StoreWriter
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
D_VOCAB = 40
NAMES = ("dense", "moe")  # harvest calls unnamed models "A" and "B"


def tiny_model(seed: int = 0, d_model: int = 16, moe: bool = False, **kw) -> HookedTransformer:
    fields = dict(
        n_layers=3,
        d_model=d_model,
        n_ctx=16,
        d_head=8,
        n_heads=2,
        d_mlp=24,
        d_vocab=D_VOCAB,
        act_fn="gelu",
        seed=seed,
    )
    if moe:
        fields.update(act_fn="silu", gated_mlp=True, num_experts=4, experts_per_token=2)
    fields.update(kw)
    return HookedTransformer(HookedTransformerConfig(**fields)).eval()


def tiny_pair() -> tuple[HookedTransformer, HookedTransformer]:
    """A dense model and a stock-TransformerLens MoE with a wider residual stream."""
    return tiny_model(seed=0), tiny_model(seed=1, d_model=24, moe=True)


def tiny_token_set(n_seq: int = 10, seq_len: int = 9, seed: int = 0) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, D_VOCAB, (n_seq, seq_len), generator=g)
    tokens[:, 0] = 0
    return TokenSet(
        tokens=tokens,
        doc_ids=(100 + torch.arange(n_seq)).unsqueeze(1).expand(n_seq, seq_len).clone(),
        doc_positions=(torch.arange(seq_len) - 1).unsqueeze(0).expand(n_seq, seq_len).clone(),
        domains=torch.arange(n_seq) % 3,
    )


def shard_checksums(store: ActivationStore) -> list[tuple[int, str]]:
    return [(s["n_tokens"], s["sha256"]) for s in store.manifest["shards"]]


def test_store_equals_run_with_cache_and_metadata_lines_up(tmp_path):
    dense, moe = tiny_pair()
    ts = tiny_token_set()
    store = harvest(
        dense, moe, ts, "paper", tmp_path / "s", batch_size=3, shard_tokens=20, model_names=NAMES
    )
    n_seq, seq_len = ts.tokens.shape
    assert store.n_tokens == n_seq * (seq_len - 1)
    assert store.d_models == [16, 24] and store.d_model == 24
    assert store.n_shards == 4  # 80 tokens in shards of 20

    acts = store.read_acts().float()
    _, cache_a = dense.run_with_cache(ts.tokens)
    _, cache_b = moe.run_with_cache(ts.tokens)
    ref_a = cache_a["blocks.2.hook_resid_post"][:, 1:].reshape(-1, 16)
    ref_b = cache_b["blocks.2.hook_resid_post"][:, 1:].reshape(-1, 24)
    # within float16 rounding (one ulp: relative 2**-10); a plain float32 compare would fail
    torch.testing.assert_close(acts[:, 0, :16], ref_a, rtol=2**-10, atol=1e-5)
    torch.testing.assert_close(acts[:, 1], ref_b, rtol=2**-10, atol=1e-5)
    assert (acts[:, 1] - ref_b).abs().max() > 0  # it really was rounded to float16
    assert (acts[:, 0, 16:] == 0).all()  # the narrower model is zero-padded

    meta = store.read_metadata()
    assert torch.equal(meta["token_ids"], ts.tokens[:, 1:].reshape(-1))
    assert torch.equal(meta["doc_ids"], ts.doc_ids[:, 1:].reshape(-1))
    assert torch.equal(meta["positions"], ts.doc_positions[:, 1:].reshape(-1))
    assert torch.equal(meta["domains"], ts.domains.repeat_interleave(seq_len - 1))
    experts = cache_b["blocks.2.mlp.hook_expert_indices"].reshape(n_seq, seq_len, 2)
    assert torch.equal(meta["experts"], experts[:, 1:].reshape(-1, 2))
    assert store.manifest["experts"]["model"] == "moe"
    # a row in the middle: the token at store index 8 * 4 + 3 is row 4, column 4
    assert int(meta["token_ids"][35]) == int(ts.tokens[4, 4])
    assert int(meta["positions"][35]) == 3


def test_float32_store_is_exact_and_stats_match(tmp_path):
    dense, moe = tiny_pair()
    ts = tiny_token_set()
    dense.train()
    store = harvest(dense, moe, ts, "single-layer", tmp_path / "s", dtype="float32", batch_size=4)
    assert dense.training and not moe.training  # modes are given back as they were
    _, cache = dense.run_with_cache(ts.tokens)
    ref = cache["blocks.0.hook_resid_post"][:, 1:].reshape(-1, 16)
    torch.testing.assert_close(store.read_acts()[:, 0, :16], ref, rtol=1e-6, atol=1e-6)
    # the statistics and scaling factors are those of the training part (held-out docs left out)
    heldout_docs = store.part("heldout").read_metadata()["doc_ids"].unique()
    assert len(heldout_docs) == 1  # 10% of 10 documents
    ref = ref[~torch.isin(store.read_metadata()["doc_ids"], heldout_docs)]
    assert len(ref) == store.part("train").n_tokens == 72
    stats = store.statistics()
    torch.testing.assert_close(stats["mean"][0, :16], ref.double().mean(0))
    torch.testing.assert_close(stats["std"][0, :16], ref.double().std(0, unbiased=False))
    mean_norm = ref.double().norm(dim=-1).mean()
    torch.testing.assert_close(stats["mean_norm"][0], mean_norm)
    assert store.scaling_factors[0].item() == pytest.approx(4.0 / mean_norm.item(), rel=1e-6)
    scaled = store.part("train").read_acts(normalize=True)[:, 0, :16]
    assert scaled.norm(dim=-1).mean().item() == pytest.approx(4.0, rel=1e-5)


def test_multi_site_concatenates_hooks_in_order_and_stops_early(tmp_path):
    dense, moe = tiny_pair()
    ts = tiny_token_set(n_seq=4)
    pairing = Pairing(
        name="two",
        sites=(("blocks.1.hook_mlp_out", "blocks.0.hook_mlp_out"), ("blocks.0.hook_mlp_out",) * 2),
        expert_indices=("blocks.0.mlp.hook_expert_indices", "blocks.1.mlp.hook_expert_indices"),
    )
    calls = []
    moe.blocks[1].hook_resid_post.add_hook(lambda x, hook: calls.append(1))
    moe.blocks[2].hook_resid_post.add_hook(lambda x, hook: calls.append(2))
    store = harvest(dense, moe, ts, pairing, tmp_path / "s", dtype="float32")
    assert 2 not in calls  # the MoE's deepest hook is in block 1: block 2 is never run
    assert store.d_models == [32, 48] and store.manifest["experts"]["width"] == 4
    _, ca = dense.run_with_cache(ts.tokens)
    _, cb = moe.run_with_cache(ts.tokens)
    acts = store.read_acts()
    a = torch.cat([ca["blocks.1.hook_mlp_out"], ca["blocks.0.hook_mlp_out"]], -1)[:, 1:]
    b = torch.cat([cb["blocks.0.hook_mlp_out"], cb["blocks.0.hook_mlp_out"]], -1)[:, 1:]
    torch.testing.assert_close(acts[:, 0, :32], a.reshape(-1, 32))
    torch.testing.assert_close(acts[:, 1], b.reshape(-1, 48))


def test_bos_inside_rows_is_dropped_and_plain_tensors_work(tmp_path):
    dense, moe = tiny_pair()
    ts = tiny_token_set(n_seq=4)
    ts.doc_positions[1, 5] = -1  # a second document starts mid-row with its own BOS
    store = harvest(dense, moe, ts, "paper", tmp_path / "s")
    assert store.n_tokens == 4 * 8 - 1
    assert -1 not in store.read_metadata()["positions"].tolist()

    plain = harvest(dense, moe, ts.tokens, "paper", tmp_path / "p", n_tokens=10)
    meta = plain.read_metadata()
    assert plain.n_tokens == 10 and plain.domain_names == []
    assert meta["doc_ids"].tolist() == [0] * 8 + [1] * 2  # row index
    assert meta["positions"].tolist()[:3] == [1, 2, 3]  # column index
    assert (meta["domains"] == -1).all()


def test_interrupted_harvest_resumes_to_the_same_store(tmp_path, monkeypatch):
    dense, moe = tiny_pair()
    ts = tiny_token_set(n_seq=12)
    kwargs = dict(batch_size=5, shard_tokens=14, n_tokens=90)
    full = harvest(dense, moe, ts, "paper", tmp_path / "full", **kwargs)

    real_write = StoreWriter.write_shard
    written = []

    def crash_after_two(self, tensors):
        if len(written) == 2:
            raise KeyboardInterrupt("injected crash after shard 2")
        real_write(self, tensors)
        written.append(1)

    monkeypatch.setattr(StoreWriter, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        harvest(dense, moe, ts, "paper", tmp_path / "resumed", **kwargs)
    assert ActivationStore(tmp_path / "resumed").n_tokens == 28
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    resumed = harvest(dense, moe, ts, "paper", tmp_path / "resumed", **kwargs)

    assert resumed.n_tokens == full.n_tokens == 90
    assert shard_checksums(resumed) == shard_checksums(full)  # byte-identical shards
    assert torch.equal(resumed.read_acts(), full.read_acts())
    assert resumed.manifest["scaling_factors"] == full.manifest["scaling_factors"]
    assert torch.equal(resumed.statistics()["std"], full.statistics()["std"])


def test_crash_between_shard_and_manifest_leaves_an_orphan_that_resume_removes(
    tmp_path, monkeypatch
):
    dense, moe = tiny_pair()
    ts = tiny_token_set()
    kwargs = dict(batch_size=3, shard_tokens=20)
    full = harvest(dense, moe, ts, "paper", tmp_path / "full", **kwargs)
    real_json = writer_module.write_json_atomic
    calls = []

    def crash_on_third_commit(path, obj):
        calls.append(path)
        if len(calls) == 3:  # creation, shard 0, then crash at shard 1's manifest
            raise RuntimeError("power cut")
        return real_json(path, obj)

    monkeypatch.setattr(writer_module, "write_json_atomic", crash_on_third_commit)
    with pytest.raises(RuntimeError):
        harvest(dense, moe, ts, "paper", tmp_path / "r", **kwargs)
    assert (tmp_path / "r" / "shard_00001.safetensors").exists()  # orphan, not in the manifest
    assert ActivationStore(tmp_path / "r").n_tokens == 20
    monkeypatch.setattr(writer_module, "write_json_atomic", real_json)
    resumed = harvest(dense, moe, ts, "paper", tmp_path / "r", **kwargs)
    assert shard_checksums(resumed) == shard_checksums(full)
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == sorted(
        ["manifest.json", "stats_00004.safetensors"]
        + [f"shard_0000{i}.safetensors" for i in range(4)]
    )


def test_extending_and_appending_never_duplicate(tmp_path):
    dense, moe = tiny_pair()
    ts, other = tiny_token_set(), tiny_token_set(n_seq=3, seed=5)
    one_go = harvest(dense, moe, ts, "paper", tmp_path / "a", n_tokens=70)
    harvest(dense, moe, ts, "paper", tmp_path / "b", n_tokens=25)
    extended = harvest(dense, moe, ts, "paper", tmp_path / "b", n_tokens=70)
    assert torch.equal(extended.read_acts(), one_go.read_acts())
    again = harvest(dense, moe, ts, "paper", tmp_path / "b", n_tokens=70)
    assert again.n_tokens == 70  # nothing re-harvested

    appended = harvest(dense, moe, other, "paper", tmp_path / "b")
    assert appended.n_tokens == 70 + 24
    assert [s["n_tokens"] for s in appended.manifest["segments"]] == [70, 24]
    assert torch.equal(appended.read_metadata(70)["token_ids"], other.tokens[:, 1:].reshape(-1))
    with pytest.raises(CrossdiffError, match="duplicate"):
        harvest(dense, moe, ts, "paper", tmp_path / "b", n_tokens=80)


def test_resume_refuses_a_different_setup(tmp_path):
    dense, moe = tiny_pair()
    ts = tiny_token_set()
    harvest(dense, moe, ts, "paper", tmp_path / "s", n_tokens=20)
    with pytest.raises(CrossdiffError, match="pairing"):
        harvest(dense, moe, ts, "single-layer", tmp_path / "s", n_tokens=40)
    with pytest.raises(CrossdiffError, match="models"):
        harvest(dense, tiny_model(seed=7, d_model=24, moe=True), ts, "paper", tmp_path / "s")
    replaced = harvest(dense, moe, ts, "single-layer", tmp_path / "s", n_tokens=8, resume=False)
    assert replaced.n_tokens == 8 and replaced.manifest["pairing"]["name"] == "single-layer"


def test_mismatched_tokenizers_are_refused(tmp_path):
    dense = tiny_model()
    with pytest.raises(CrossdiffError, match="d_vocab=40.*d_vocab=41"):
        harvest(dense, tiny_model(d_vocab=41), tiny_token_set(), "paper", tmp_path / "s")
    with pytest.raises(CrossdiffError, match="tokenizers differ"):
        harvest(
            dense,
            tiny_model(seed=1),
            tiny_token_set(),
            "paper",
            tmp_path / "s",
            tokenizer_fingerprints=("abc", "abd"),
        )
    assert not (tmp_path / "s").exists()


def test_tokens_outside_the_vocabulary_are_refused(tmp_path):
    ts = tiny_token_set()
    ts.tokens[2, 3] = D_VOCAB + 5
    with pytest.raises(CrossdiffError, match="has id 45"):
        harvest(*tiny_pair(), ts, "paper", tmp_path / "s")


def test_missing_hook_lists_close_matches(tmp_path):
    pairing = Pairing(name="typo", sites=(("blocks.2.hook_resid_post", "blocks.2.hook_resid_pst"),))
    with pytest.raises(
        CrossdiffError, match=r"'moe' has no hook point.*blocks\.2\.hook_resid_post"
    ):
        harvest(*tiny_pair(), tiny_token_set(), pairing, tmp_path / "s", model_names=NAMES)


def test_hook_that_is_not_batch_pos_d_is_refused(tmp_path):
    pairing = Pairing(name="z", sites=(("blocks.0.attn.hook_z", "blocks.0.hook_resid_post"),))
    with pytest.raises(CrossdiffError, match=r"hook_z.*\(1, 9, 2, 8\).*\[batch, pos, d\]"):
        harvest(*tiny_pair(), tiny_token_set(n_seq=10), pairing, tmp_path / "s", batch_size=10)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_nan_activations_name_model_hook_and_batch(tmp_path):
    dense, moe = tiny_pair()
    ts = tiny_token_set()
    poisoned = ts.tokens.clone()
    poisoned[6:, 1:] = 7  # rows 6.. contain token 7, whose embedding we poison
    ts = TokenSet(poisoned, ts.doc_ids, ts.doc_positions, ts.domains)
    with torch.no_grad():
        moe.W_E[7] = float("inf")
    with pytest.raises(
        CrossdiffError, match=r"'moe'.*NaN or Inf.*blocks\.2\.hook_resid_post.*rows 6"
    ):
        harvest(
            dense, moe, ts, "paper", tmp_path / "s", batch_size=3, shard_tokens=8, model_names=NAMES
        )
    store = ActivationStore(tmp_path / "s")
    assert store.n_tokens == 48  # only the clean rows 0..5, in full shards
    assert torch.isfinite(store.read_acts().float()).all()


def test_full_disk_gives_a_clear_error_and_keeps_the_store_consistent(tmp_path, monkeypatch):
    dense, moe = tiny_pair()
    ts = tiny_token_set()
    kwargs = dict(batch_size=3, shard_tokens=20)
    full = harvest(dense, moe, ts, "paper", tmp_path / "full", **kwargs)
    real_write = writer_module._write_bytes
    calls = []

    def disk_fills_up(path, data):
        calls.append(path)
        if len(calls) == 5:  # shard 0, stats 1, shard 1, stats 2, then shard 2 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(writer_module, "_write_bytes", disk_fills_up)
    with pytest.raises(CrossdiffError, match="disk is full.*intact with 40 tokens.*re-run"):
        harvest(dense, moe, ts, "paper", tmp_path / "s", **kwargs)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    assert not (tmp_path / "s" / "shard_00002.safetensors").exists()
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(writer_module, "_write_bytes", real_write)
    resumed = harvest(dense, moe, ts, "paper", tmp_path / "s", **kwargs)
    assert shard_checksums(resumed) == shard_checksums(full)


def test_too_many_tokens_asked_is_an_error_not_a_short_store(tmp_path):
    with pytest.raises(CrossdiffError, match="at most 80"):
        harvest(*tiny_pair(), tiny_token_set(), "paper", tmp_path / "s", n_tokens=81)


def test_crossdiff_moe_experts_are_recorded(tmp_path):
    models = pytest.importorskip("crossdiff.models")
    if not hasattr(models, "build_model"):
        pytest.skip("crossdiff.models is not assembled yet")
    cfg = dict(n_layers=3, d_model=16, d_head=8, n_heads=2, d_mlp=24, d_vocab=D_VOCAB, n_ctx=16)
    dense = models.build_model(models.dense_config("tiny", **cfg))
    moe = models.build_model(models.moe_config("tiny", **cfg))
    ts = tiny_token_set(n_seq=3)
    store = harvest(dense, moe, ts, "paper", tmp_path / "s")
    _, cache = moe.run_with_cache(ts.tokens)
    expected = cache["blocks.2.mlp.hook_topk_indices"][:, 1:]
    assert torch.equal(store.read_metadata()["experts"], expected.reshape(-1, expected.shape[-1]))
