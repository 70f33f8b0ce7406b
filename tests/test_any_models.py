"""Any two models TransformerLens can run: HookedTransformers and TransformerBridges (over tiny
random Hugging Face GPT-2s built here, no hub), plain token tensors with and without domains,
hook aliases, and the models' own names (A and B when unnamed) in messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import crossdiff
from crossdiff.activations import ActivationStore, Pairing, harvest
from crossdiff.plumbing.common import CrossdiffError

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]
D_VOCAB = 40
ROOT = Path(__file__).resolve().parents[1]


def tiny_hooked(seed: int, d_model: int = 16) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=d_model, n_ctx=16, d_head=8, n_heads=2, d_mlp=32, d_vocab=D_VOCAB,
        act_fn="gelu", seed=seed,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=16, vocab_size=D_VOCAB)
    return GPT2LMHeadModel(cfg).eval()


def save_hf(model: GPT2LMHeadModel, folder: Path) -> Path:
    """A local Hugging Face checkpoint with a word-level tokenizer of the model's vocabulary."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(D_VOCAB)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="t0", eos_token="t0")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hooked_copy(hf: GPT2LMHeadModel) -> HookedTransformer:
    """The same GPT-2 weights as a HookedTransformer (no folding: the numbers of the HF model)."""
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=4 * c.n_embd, n_ctx=c.n_positions, d_vocab=c.vocab_size, act_fn="gelu_new",
        normalization_type="LN",
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2s(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    hf = [tiny_gpt2(0), tiny_gpt2(1)]
    folders = [save_hf(m, root / f"gpt2_{i}") for i, m in enumerate(hf)]
    bridges = [TransformerBridge.boot_transformers(str(f)) for f in folders]
    return {"hf": hf, "folders": folders, "bridges": bridges}


def random_tokens(n_seq: int = 6, seq_len: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, D_VOCAB, (n_seq, seq_len), generator=g)


def hf_forward_hooks(hf: GPT2LMHeadModel, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block 0's output and block 1's MLP output of the Hugging Face model, by torch hooks."""
    got: dict[str, torch.Tensor] = {}

    def keep(key):
        return lambda module, args, out: got.__setitem__(
            key, out[0] if isinstance(out, tuple) else out
        )

    handles = [
        hf.transformer.h[0].register_forward_hook(keep("resid0")),
        hf.transformer.h[1].mlp.register_forward_hook(keep("mlp1")),
    ]
    with torch.no_grad():
        hf(tokens)
    for h in handles:
        h.remove()
    return got


RESID_AND_MLP = Pairing(
    name="resid-mlp",
    sites=(("blocks.0.hook_resid_post",) * 2, ("blocks.1.hook_mlp_out",) * 2),
)


# --- TransformerBridge ---------------------------------------------------------------------------


def test_bridge_and_hooked_transformer_of_one_gpt2_store_the_same_activations(gpt2s, tmp_path):
    """A Bridge and a HookedTransformer over the same weights, paired at a resid and an mlp_out
    hook: both columns equal the Hugging Face model's own block outputs, and the Bridge stops
    after block 1 (its block 2 never runs)."""
    bridge, hf = gpt2s["bridges"][0], gpt2s["hf"][0]
    tokens = random_tokens()
    ran_block_2 = []
    bridge.blocks[2].hook_out.add_hook(lambda x, hook: ran_block_2.append(1))
    try:
        store = harvest(
            bridge, hooked_copy(hf), tokens, RESID_AND_MLP, tmp_path / "s", dtype="float32",
            progress=False,
        )  # fmt: skip
    finally:
        bridge.blocks[2].hook_out.remove_hooks(including_permanent=True)
    assert not ran_block_2
    assert store.model_names == ["A", "B"] and store.d_models == [64, 64]
    got = hf_forward_hooks(hf, tokens)
    want = torch.cat([got["resid0"], got["mlp1"]], -1)[:, 1:].reshape(-1, 64)
    acts = store.read_acts()
    torch.testing.assert_close(acts[:, 0], want, atol=1e-5, rtol=1e-5)  # the Bridge
    torch.testing.assert_close(acts[:, 1], want, atol=1e-5, rtol=1e-5)  # the HookedTransformer


def test_two_bridges_alias_and_canonical_names_give_one_store(gpt2s, tmp_path):
    """`blocks.0.hook_resid_post` on a Bridge is its `blocks.0.hook_out`: the pairing may use
    either name (the error this fixes: 'hook ... did not fire')."""
    tokens = random_tokens(seed=1)
    canonical = Pairing(
        name="canonical", sites=(("blocks.0.hook_out",) * 2, ("blocks.1.mlp.hook_out",) * 2)
    )
    by_alias = harvest(*gpt2s["bridges"], tokens, RESID_AND_MLP, tmp_path / "a", progress=False)
    by_name = harvest(*gpt2s["bridges"], tokens, canonical, tmp_path / "c", progress=False)
    torch.testing.assert_close(by_alias.read_acts(), by_name.read_acts(), atol=0, rtol=0)
    for m, hf in enumerate(gpt2s["hf"]):
        got = hf_forward_hooks(hf, tokens)
        want = torch.cat([got["resid0"], got["mlp1"]], -1)[:, 1:].reshape(-1, 64)
        torch.testing.assert_close(by_alias.read_acts()[:, m].float(), want, atol=2e-3, rtol=2e-3)


def test_a_bridge_that_cannot_stop_early_runs_the_full_pass(gpt2s, tmp_path, monkeypatch):
    """stop_at_layer raises NotImplementedError on Bridges over non-standard block lists: the
    harvest then runs full passes and stores the same activations."""
    bridge, other = gpt2s["bridges"]
    tokens = random_tokens(seed=2)
    reference = harvest(bridge, other, tokens, RESID_AND_MLP, tmp_path / "r", progress=False)
    full_passes = []
    forward = bridge.forward

    def no_early_stop(*args, stop_at_layer=None, **kwargs):
        if stop_at_layer is not None:
            raise NotImplementedError("stop_at_layer is not supported")
        full_passes.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(bridge, "forward", no_early_stop)
    store = harvest(bridge, other, tokens, RESID_AND_MLP, tmp_path / "s", progress=False)
    assert len(full_passes) >= 2  # the width probe and the batch
    torch.testing.assert_close(store.read_acts(), reference.read_acts(), atol=0, rtol=0)


# --- names --------------------------------------------------------------------------------------


def test_unnamed_models_are_called_a_and_b_in_errors(tmp_path):
    models = (tiny_hooked(0), tiny_hooked(1))
    # attn.hook_result exists but fires only after set_use_attn_result(True)
    silent = Pairing(
        name="silent", sites=(("blocks.0.hook_resid_post", "blocks.0.attn.hook_result"),)
    )
    with pytest.raises(
        CrossdiffError,
        match=r"'blocks\.0\.attn\.hook_result' of model 'B' did not fire.*set_use_attn_result",
    ):
        harvest(*models, random_tokens(), silent, tmp_path / "s", progress=False)
    typo = Pairing(name="typo", sites=(("blocks.0.hook_resid_pst", "blocks.0.hook_resid_post"),))
    with pytest.raises(
        CrossdiffError, match=r"model 'A' has no hook point 'blocks\.0\.hook_resid_pst'"
    ):
        harvest(*models, random_tokens(), typo, tmp_path / "t", progress=False)
    with pytest.raises(CrossdiffError, match=r"model 'early' has no hook point"):
        harvest(*models, random_tokens(), typo, tmp_path / "t", model_names=("early", "late"))


# --- plain token tensors ------------------------------------------------------------------------


def planted_rows(n_seq: int = 60, seq_len: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of domain 0 use tokens 1..19, of domain 1 tokens 20..39, of no domain (-1) any."""
    g = torch.Generator().manual_seed(0)
    domains = torch.tensor([0, 1, -1]).repeat(n_seq // 3)
    low = torch.randint(1, 20, (n_seq, seq_len), generator=g)
    high = torch.randint(20, D_VOCAB, (n_seq, seq_len), generator=g)
    tokens = torch.where((domains == 1)[:, None], high, low)
    any_row = torch.randint(1, D_VOCAB, (n_seq, seq_len), generator=g)
    return torch.where((domains == -1)[:, None], any_row, tokens), domains


def train_small(store: ActivationStore):
    cfg = crossdiff.CrossCoderConfig(d_model=16, d_sae=48, k=4)
    return crossdiff.train_crosscoder(store, cfg, steps=300, batch_size=64, log_every=10_000)


@pytest.mark.slow  # about 11 s: the report's figures
def test_plain_tensor_without_domains_end_to_end(tmp_path):
    """A plain tensor, no domains: the store records none, and the diff and report have no
    domain columns (before: 'bincount only supports 1-d non-negative integral inputs'). Model B is
    a copy of A, so every live latent is shared and none is A-only or B-only."""
    model_a = tiny_hooked(0)
    model_b = tiny_hooked(1)
    model_b.load_state_dict(model_a.state_dict())
    tokens, _ = planted_rows()
    store = harvest(model_a, model_b, tokens, "single-layer", tmp_path / "s", progress=False)
    assert store.domain_names == [] and store.model_names == ["A", "B"]
    assert (store.read_metadata()["domains"] == -1).all()
    diff = crossdiff.diff_features(train_small(store), store, show_progress=False)
    assert not [c for c in diff.table.columns if c.startswith(("share_", "lift_"))]
    assert diff.summary["domains"] == {"recorded": False}
    counts = diff.summary["class_counts"]
    assert counts["A-only"] == 0 and counts["B-only"] == 0 and counts["shared"] >= 20  # 24
    paths = crossdiff.write_report(diff, tmp_path / "report")
    report = json.loads(Path(paths["json"]).read_text())
    assert report["summary"]["domains"] == {"recorded": False}
    assert Path(paths["html"]).stat().st_size > 0


def test_plain_tensor_with_domains_gives_domain_shares(tmp_path):
    """One domain per row (-1 for none): the store records them per token, the diff counts only
    tokens with a domain: each latent's shares are its activation mass per domain, recomputed
    here from the trained crosscoder (planted rows: each domain its own half of the vocabulary)."""
    model_a, model_b = tiny_hooked(0), tiny_hooked(1)
    tokens, domains = planted_rows()
    store = harvest(
        model_a, model_b, tokens, "single-layer", tmp_path / "s", progress=False,
        domains=domains, domain_names=["low", "high"], model_names=("small", "big"),
    )  # fmt: skip
    assert store.domain_names == ["low", "high"]
    meta = store.read_metadata()
    torch.testing.assert_close(meta["domains"].long(), domains[meta["doc_ids"]])
    cc = train_small(store)
    diff = crossdiff.diff_features(cc, store, show_progress=False)
    assert {"share_low", "share_high", "lift_low", "lift_high"} <= set(diff.table.columns)
    assert set(diff.summary["class_counts"]) >= {"small-only", "big-only"}
    heldout = store.part("heldout").read_metadata()["domains"]
    known = heldout[heldout >= 0]
    want_low = float((known == 0).double().mean())
    token_share = diff.summary["domains"]["token_share"]
    assert token_share["low"] == pytest.approx(want_low, abs=1e-9)
    assert token_share["low"] + token_share["high"] == pytest.approx(1.0)
    # the shares are each latent's activation mass per domain over the held-out tokens with one
    # (tokens of the rows of no domain count in neither)
    part = store.part("heldout")
    f = cc.encode(part.read_acts(normalize=False).float()).detach().double()
    dom = torch.as_tensor(part.read_metadata()["domains"]).long()
    mass = torch.stack([f[dom == d].sum(0) for d in (0, 1)], dim=1)  # [d_sae, 2]
    live = mass.sum(1) > 0
    want = (mass[live] / mass[live].sum(1, keepdim=True)).numpy()
    got = diff.table.loc[live.numpy(), ["share_low", "share_high"]].to_numpy()
    assert live.sum() >= 10 and abs(got - want).max() < 1e-4
    assert f[dom == -1].sum() > 0  # the rows of no domain did fire latents (and were left out)


def test_domains_argument_is_checked(tmp_path):
    models = (tiny_hooked(0), tiny_hooked(1))
    tokens = random_tokens()
    with pytest.raises(CrossdiffError, match=r"one integer per row.*\(6,\)"):
        harvest(*models, tokens, "single-layer", tmp_path / "a", domains=torch.zeros(6, 8))
    with pytest.raises(CrossdiffError, match=r"-1\.\.1.*got 0\.\.2"):
        harvest(*models, tokens, "single-layer", tmp_path / "b", domains=[0, 1, 2, 0, 1, 2],
                domain_names=["x", "y"])  # fmt: skip
    with pytest.raises(CrossdiffError, match="domain_names= needs domains="):
        harvest(*models, tokens, "single-layer", tmp_path / "c", domain_names=["x"])
    store = harvest(*models, tokens, "single-layer", tmp_path / "d", domains=[1, 0, 1, 0, 1, 0])
    assert store.domain_names == ["domain_0", "domain_1"]


# --- the README's snippet ------------------------------------------------------------------------


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Bring your own models") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's 'Bring your own models' section has no python block"
    return match.group(1)


def test_readme_snippet_is_the_example_and_runs_as_written(gpt2s, tmp_path, monkeypatch):
    """The README's bring-your-own block is the example's step 2, line for line; run as written
    with a tiny HookedTransformer (model A) and a tiny local GPT-2 folder (model B)."""
    code = readme_snippet()
    example = (ROOT / "examples" / "bring_your_own_models.py").read_text()
    body = example.split("# --- README snippet begins\n")[1].split("    # --- README snippet ends")[
        0
    ]
    assert code == "\n".join(line[4:] for line in body.splitlines()) + "\n"

    tokens, domains = planted_rows(n_seq=30)
    monkeypatch.chdir(tmp_path)
    namespace = {
        "model_a": hooked_copy(gpt2s["hf"][1]),  # a HookedTransformer of another GPT-2
        "hf_folder": gpt2s["folders"][0],
        "tokens": tokens,
        "domains": domains,
        "domain_names": ["low", "high"],
        "out": tmp_path / "byo",
        "steps": 50,
    }
    exec(compile(code, "README.md", "exec"), namespace)
    store, diff = namespace["store"], namespace["diff"]
    assert store.model_names == ["hooked", "hf"] and store.d_models == [32, 32]
    assert set(diff.summary["class_counts"]) >= {"hooked-only", "hf-only", "shared"}
    assert "share_low" in diff.table.columns
    assert Path(namespace["paths"]["html"]).exists()
