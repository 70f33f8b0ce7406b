"""SAELens conventions: the flat `[batch, d_in]` input (`cfg.d_in = n_models * d_model`) beside
`[batch, n_models, d_model]`, and `HookedSAETransformer.add_sae(crosscoder)` refused at add_sae
with what to use instead (before: accepted, then `run_with_saes` failed)."""

from __future__ import annotations

import pytest
import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformerConfig

import crossdiff
from crossdiff.plumbing.common import CrossdiffError

pytestmark = pytest.mark.usefixtures("one_thread")


def crosscoder() -> crossdiff.CrossCoder:
    torch.manual_seed(0)
    cc = crossdiff.CrossCoder(crossdiff.CrossCoderConfig(d_model=8, d_sae=32, k=4))
    with torch.no_grad():
        cc.threshold.fill_(0.05)
    return cc


def test_flat_input_encodes_decodes_and_reconstructs_like_the_stacked_one():
    cc = crosscoder()
    assert cc.cfg.d_in == 16
    x = torch.randn(5, 2, 8)
    f = cc.encode(x)
    assert (f > 0).any()
    torch.testing.assert_close(cc.encode(x.reshape(5, 16)), f, atol=0, rtol=0)
    # with a position axis, as HookedSAETransformer and SAELens's evals pass it
    torch.testing.assert_close(cc.encode(x.reshape(1, 5, 16)), f[None], atol=0, rtol=0)
    torch.testing.assert_close(cc.decode_flat(f), cc.decode(f).reshape(5, 16), atol=0, rtol=0)
    assert cc(x).shape == (5, 2, 8) and cc(x.reshape(5, 16)).shape == (5, 16)
    torch.testing.assert_close(cc(x.reshape(5, 16)), cc(x).reshape(5, 16), atol=0, rtol=0)
    with pytest.raises(CrossdiffError, match=r"expected \[batch, n_models=2, d_model=8\]"):
        cc.encode(torch.randn(5, 15))


def test_add_sae_refuses_a_crosscoder_and_names_the_splice():
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10, attn_only=True
    )
    model = HookedSAETransformer(cfg)
    cc = crosscoder()
    cc.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    with pytest.raises(CrossdiffError, match=r"add_sae cannot take a crossdiff crosscoder.*"
                       r"spliced_loss"):  # fmt: skip
        model.add_sae(cc)
    assert not model.acts_to_saes  # nothing was attached
    from crossdiff.crosscoder.registration import register_with_sae_lens

    register_with_sae_lens()
    inner = HookedSAETransformer.add_sae.__wrapped__
    assert not getattr(inner, "_crossdiff_guard", False)
