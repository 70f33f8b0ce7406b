"""One tokenizer identity for a Hugging Face tokenizer, however it reaches crossdiff: the TokenSet
of `prepare_data(tokenizer=<the model's folder>)`, the folder's tokenizer on a TransformerBridge
and on a HookedTransformer all carry one fingerprint, so the harvest accepts the token set (before:
refused as 'made with another tokenizer'), and another tokenizer is still refused."""

from __future__ import annotations

import hf_folders as hf
import pytest
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoTokenizer

from crossdiff.activations import harvest
from crossdiff.activations.identity import vocab_fingerprint
from crossdiff.data import load_tokenizer, prepare_data
from crossdiff.plumbing.common import CrossdiffError

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def hooked(tokenizer) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=hf.D_MODEL, n_ctx=16, d_head=8, n_heads=2, d_mlp=64,
        d_vocab=hf.D_VOCAB, act_fn="gelu", seed=0,
    )  # fmt: skip
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def test_token_set_from_a_hf_folder_harvests_with_bridge_and_hooked_models(tmp_path):
    folder = hf.save(hf.gpt2(0), tmp_path / "gpt2")
    data = prepare_data(
        tmp_path / "data", source="embedded", n_chars_per_domain=3_000, seq_len=8,
        tokenizer=folder,
    )  # fmt: skip
    bridge = TransformerBridge.boot_transformers(str(folder))
    model = hooked(AutoTokenizer.from_pretrained(folder))
    want = data.train.tokenizer_fingerprint
    assert want and vocab_fingerprint(bridge) == want and vocab_fingerprint(model) == want
    rows = data.train.subset(slice(0, 6))
    store = harvest(bridge, model, rows, "single-layer", tmp_path / "s", progress=False)
    assert store.manifest["tokenizer"]["fingerprint"] == want
    assert store.n_tokens == 6 * 7

    other = tmp_path / "other"
    tok = hf.word_tokenizer()
    tok.add_tokens(["extra"])  # one more token: other ids for other text
    tok.save_pretrained(other)
    assert load_tokenizer(other).fingerprint != want
    with pytest.raises(CrossdiffError, match="the models' tokenizers differ"):
        harvest(bridge, hooked(AutoTokenizer.from_pretrained(other)), rows, "single-layer",
                tmp_path / "t", progress=False)  # fmt: skip
    pair = [hooked(AutoTokenizer.from_pretrained(other)) for _ in range(2)]
    with pytest.raises(CrossdiffError, match="token set was made with another tokenizer"):
        harvest(*pair, rows, "single-layer", tmp_path / "u", progress=False)
