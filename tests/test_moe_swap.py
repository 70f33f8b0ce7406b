"""swap_in_crossdiff_moe on random-weight configs built the way TransformerLens builds Mixtral,
OLMoE and GPT-OSS: same logits as stock, stock hooks with stock tensors, crossdiff's extra hooks,
a `paper` harvest, and clean errors for what it cannot swap."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformer_lens.loading_from_pretrained as tl_loading
import transformers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components.mlps.moe import MoE

import crossdiff
from crossdiff.activations import harvest
from crossdiff.data.tokens import TokenSet
from crossdiff.models import CrossdiffGptOssMoE, CrossdiffMoE, swap_in_crossdiff_moe
from crossdiff.plumbing.common import CrossdiffError

# one torch thread: the hook values are compared at 1e-5, and how a matmul splits its sums over
# threads moves the last bits (the gpt-oss case's gate pre-activations exceed 1e-5 on 2 threads)
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]

D_VOCAB, N_EXPERTS, TOP_K, D_MODEL = 64, 4, 2, 32
_HF_SIZES = dict(
    hidden_size=D_MODEL,
    intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=D_VOCAB,
    max_position_embeddings=64,
    num_experts_per_tok=TOP_K,
)


def _hf_config(arch: str, **extra) -> transformers.PretrainedConfig:
    sizes = {**_HF_SIZES, **extra}
    if arch == "mixtral":
        return transformers.MixtralConfig(
            num_local_experts=N_EXPERTS, architectures=["MixtralForCausalLM"], **sizes
        )
    if arch == "olmoe":
        return transformers.OlmoeConfig(
            num_experts=N_EXPERTS, architectures=["OlmoeForCausalLM"], **sizes
        )
    assert arch == "gpt-oss"
    return transformers.GptOssConfig(
        num_local_experts=N_EXPERTS,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        architectures=["GptOssForCausalLM"],
        **sizes,
    )


_OFFICIAL = {
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "olmoe": "allenai/OLMoE-1B-7B-0924",
    "gpt-oss": "openai/gpt-oss-20b",
}


def tl_config(arch: str, **extra) -> HookedTransformerConfig:
    """The HookedTransformerConfig TransformerLens's own conversion makes from a (tiny) Hugging Face
    config of `arch`, in float32 and without a tokenizer (nothing is fetched)."""
    with mock.patch.object(
        tl_loading.AutoConfig, "from_pretrained", return_value=_hf_config(arch, **extra)
    ):
        fields = tl_loading.convert_hf_model_config(_OFFICIAL[arch])
    fields.pop("tokenizer_name")
    fields["dtype"] = torch.float32
    return HookedTransformerConfig(**fields)


def stock_model(cfg: HookedTransformerConfig, seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg).eval()
    if cfg.original_architecture == "GptOssForCausalLM":
        # larger expert weights, so GPT-OSS's clamps at +-7 are exercised
        with torch.no_grad():
            for block in model.blocks:
                for expert in block.mlp.experts:
                    expert.W_gate.weight.mul_(60.0)
                    expert.W_in.weight.mul_(60.0)
    return model


CASES = {
    "mixtral": lambda: tl_config("mixtral"),  # norm_topk_prob pinned True by TransformerLens
    "olmoe-norm-false": lambda: tl_config("olmoe", norm_topk_prob=False),
    "olmoe-norm-true": lambda: tl_config("olmoe", norm_topk_prob=True),
    "olmoe-gelu": lambda: tl_config("olmoe", hidden_act="gelu"),  # not the SiLU grouped path
    "gpt-oss": lambda: tl_config("gpt-oss"),
    # a hand-made stock MoE: LayerNorm, learned positions, top-1
    "layernorm-learned-pos": lambda: HookedTransformerConfig(
        n_layers=3, d_model=D_MODEL, n_ctx=16, d_head=8, n_heads=4, d_mlp=16, d_vocab=D_VOCAB,
        act_fn="gelu_new", normalization_type="LN", num_experts=N_EXPERTS, experts_per_token=1,
        dtype=torch.float32,
    ),
}  # fmt: skip


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))


def _expert_rows_sorted(x: torch.Tensor) -> torch.Tensor:
    """An expert-internal hook's rows (routed tokens) in a canonical order: by a random projection,
    since single columns tie where GPT-OSS's clamps saturate."""
    key = x.double() @ torch.rand(x.shape[1], generator=torch.Generator().manual_seed(0)).double()
    return x[key.argsort()]


@pytest.mark.parametrize("case", list(CASES))
def test_swap_keeps_logits_weights_and_stock_hooks(case, tokens):
    cfg = CASES[case]()
    model = stock_model(cfg)
    stock_class = type(model.blocks[0].mlp)
    stock_params = {name: p for name, p in model.named_parameters()}
    stock_logits, stock_cache = model.run_with_cache(tokens)

    assert swap_in_crossdiff_moe(model) is model
    expected = CrossdiffGptOssMoE if case == "gpt-oss" else CrossdiffMoE
    assert all(type(block.mlp) is expected for block in model.blocks), stock_class
    # the very same parameter objects, under the same names
    assert {name: p for name, p in model.named_parameters()} == stock_params
    # without hooks inside the experts (SiLU: the grouped path) and with every hook cached
    torch.testing.assert_close(model(tokens), stock_logits, atol=1e-5, rtol=0)
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, stock_logits, atol=1e-5, rtol=0)

    assert set(stock_cache.keys()) <= set(cache.keys())
    for name, stock in stock_cache.items():
        ours = cache[name]
        assert ours.shape == stock.shape and ours.dtype == stock.dtype, name
        if ".experts." in name:  # the same routed rows, grouped by token instead of by choice
            ours, stock = _expert_rows_sorted(ours), _expert_rows_sorted(stock)
        torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0, msg=name)
    stock_weights = stock_cache["blocks.1.mlp.hook_expert_weights"]
    assert stock_weights.shape == (tokens.numel(), N_EXPERTS)
    if case == "gpt-oss":
        pre = stock_cache["blocks.1.mlp.experts.0.hook_pre"]
        assert pre.abs().max() > 7.0  # the clamp was exercised
        assert int((stock_weights > 0).sum(dim=1).max()) == TOP_K  # stock routing table
    else:
        torch.testing.assert_close(stock_weights.sum(dim=1), torch.ones(tokens.numel()))


@pytest.mark.parametrize("case", ["mixtral", "olmoe-norm-false", "gpt-oss"])
def test_crossdiff_hooks_have_documented_shapes_and_meaning(case, tokens):
    cfg = CASES[case]()
    model = swap_in_crossdiff_moe(stock_model(cfg))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1."))
    (b, p), e, k, d = tokens.shape, N_EXPERTS, TOP_K, D_MODEL
    hook = "blocks.1.mlp."
    assert cache[hook + "hook_router_logits"].shape == (b, p, e)
    assert cache[hook + "hook_expert_weights"].shape == (b * p, e)
    assert cache[hook + "hook_expert_indices"].shape == (b * p, k)
    assert cache[hook + "hook_topk_weights"].shape == (b, p, k)
    assert cache[hook + "hook_topk_indices"].shape == (b, p, k)
    assert cache[hook + "hook_expert_out"].shape == (b, p, k, d)
    indices = cache[hook + "hook_expert_indices"]
    assert torch.equal(cache[hook + "hook_topk_indices"].reshape(b * p, k), indices)
    picked = cache[hook + "hook_expert_weights"].gather(1, indices)
    if cfg.norm_topk_prob:
        picked = picked / picked.sum(dim=1, keepdim=True)
    torch.testing.assert_close(cache[hook + "hook_topk_weights"].reshape(b * p, k), picked)
    torch.testing.assert_close(
        cache[hook + "hook_expert_out"].sum(dim=2), cache["blocks.1.hook_mlp_out"]
    )


@pytest.mark.parametrize("case", ["olmoe-norm-true", "gpt-oss"])
def test_patching_a_stock_hook_has_the_stock_effect(case, tokens):
    """The same patch on stock and swapped models gives the same logits (and changes them)."""

    def ban_top_expert(value, hook):  # stock hook_expert_weights: [batch*pos, num_experts]
        value = value.clone()
        value[:, int(value.sum(dim=0).argmax())] = 0.0
        return value

    def run(model):
        hooks = [(f"blocks.{i}.mlp.hook_expert_weights", ban_top_expert) for i in range(3)]
        return model.run_with_hooks(tokens, fwd_hooks=hooks)

    stock = stock_model(CASES[case]())
    clean, patched_stock = stock(tokens), run(stock)
    patched_ours = run(swap_in_crossdiff_moe(stock))
    assert (patched_stock - clean).abs().max() > 1e-3
    torch.testing.assert_close(patched_ours, patched_stock, atol=1e-5, rtol=0)


def test_paper_harvest_on_a_swapped_pretrained_style_moe(tmp_path, tokens):
    dense_cfg = HookedTransformerConfig(
        n_layers=3, d_model=D_MODEL, n_ctx=64, d_head=8, n_heads=4, d_mlp=32, d_vocab=D_VOCAB,
        act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", dtype=torch.float32,
    )  # fmt: skip
    dense = stock_model(dense_cfg, seed=2)
    stock = stock_model(tl_config("olmoe", norm_topk_prob=False), seed=3)
    rows = torch.randint(0, D_VOCAB, (12, 9), generator=torch.Generator().manual_seed(4))
    options = dict(progress=False, dtype="float32", heldout_fraction=0.0)
    from_stock = harvest(dense, stock, rows, "paper", tmp_path / "stock", **options)
    moe = swap_in_crossdiff_moe(stock)
    store = harvest(dense, moe, rows, "paper", tmp_path / "swapped", **options)

    _, cache = moe.run_with_cache(rows)
    experts = store.read_metadata()["experts"]
    expected = cache["blocks.2.mlp.hook_topk_indices"][:, 1:]  # the paper pairing drops BOS
    assert torch.equal(experts.long(), expected.reshape(-1, TOP_K))
    assert torch.equal(experts, from_stock.read_metadata()["experts"])
    assert store.manifest["experts"]["hooks"] == ["blocks.2.mlp.hook_expert_indices"]


def test_swap_is_idempotent_and_keeps_requires_grad(tokens):
    model = stock_model(tl_config("mixtral"))
    model.requires_grad_(False)
    swap_in_crossdiff_moe(model)
    first = [block.mlp for block in model.blocks]
    swap_in_crossdiff_moe(model)
    assert [block.mlp for block in model.blocks] == first
    assert not any(p.requires_grad for p in model.parameters())
    assert "blocks.0.mlp.hook_topk_weights" in model.hook_dict
    assert crossdiff.swap_in_crossdiff_moe is swap_in_crossdiff_moe


def test_swap_keeps_bfloat16_weights_as_they_are():
    cfg = tl_config("mixtral")
    cfg.dtype = torch.bfloat16
    model = stock_model(cfg).to(torch.bfloat16)
    stock_ptrs = sorted(p.data_ptr() for p in model.parameters())
    swap_in_crossdiff_moe(model)
    assert sorted(p.data_ptr() for p in model.parameters()) == stock_ptrs
    assert all(p.dtype == torch.bfloat16 for p in model.blocks[0].mlp.parameters())


def test_a_dense_model_is_refused():
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=8, d_head=8, n_heads=2, d_mlp=16, d_vocab=D_VOCAB,
        act_fn="gelu",
    )  # fmt: skip
    with pytest.raises(CrossdiffError, match="no Mixture-of-Experts block"):
        swap_in_crossdiff_moe(stock_model(cfg))


def test_an_unknown_moe_class_is_refused_and_nothing_is_swapped():
    class ScaledMoE(MoE):
        def forward(self, x):
            return 2 * super().forward(x)

    model = stock_model(tl_config("olmoe"))
    model.blocks[1].mlp = ScaledMoE(model.cfg)
    with pytest.raises(CrossdiffError, match="cannot represent"):
        swap_in_crossdiff_moe(model)
    assert type(model.blocks[1].mlp) is ScaledMoE


def test_attached_hooks_are_refused_rather_than_dropped():
    model = stock_model(tl_config("olmoe"))
    model.blocks[0].mlp.hook_expert_indices.add_hook(lambda value, hook: value)
    with pytest.raises(CrossdiffError, match="reset_hooks"):
        swap_in_crossdiff_moe(model)
    model.reset_hooks()
    assert isinstance(swap_in_crossdiff_moe(model).blocks[0].mlp, CrossdiffMoE)


def test_a_non_hooked_transformer_is_refused():
    with pytest.raises(CrossdiffError, match="HookedTransformer.from_pretrained"):
        swap_in_crossdiff_moe(torch.nn.Linear(2, 2))


def _load_example():
    path = Path(__file__).parents[1] / "examples" / "pretrained_dense_vs_moe.py"
    spec = importlib.util.spec_from_file_location("pretrained_dense_vs_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # about 25 s on the shared 2-core CPU (crosscoder, diff pass, report figures)
def test_the_olmo_vs_olmoe_example_runs_on_tiny_models_of_the_same_architectures(tmp_path):
    """The example's non-hub part (harvest with hooks/olmo-vs-olmoe.toml, crosscoder, report) on
    8-layer random models: an OLMoE built by TransformerLens's conversion and a dense model like
    OLMo-1B (TransformerLens hard-codes OLMo-1B's full-size config, so it is made by hand)."""
    example = _load_example()
    dense_cfg = HookedTransformerConfig(
        n_layers=8, d_model=D_MODEL, n_ctx=64, d_head=8, n_heads=4, d_mlp=32, d_vocab=D_VOCAB,
        act_fn="silu", gated_mlp=True, normalization_type="LNPre",
        positional_embedding_type="rotary", dtype=torch.float32,
    )  # fmt: skip
    dense = stock_model(dense_cfg, seed=5)
    moe = swap_in_crossdiff_moe(stock_model(tl_config("olmoe", num_hidden_layers=8), seed=6))
    n_seq, seq_len = 24, 16
    g = torch.Generator().manual_seed(7)
    tokens = TokenSet(
        tokens=torch.randint(1, D_VOCAB, (n_seq, seq_len), generator=g),
        doc_ids=torch.arange(n_seq).unsqueeze(1).expand(n_seq, seq_len).clone(),
        doc_positions=torch.arange(seq_len).unsqueeze(0).expand(n_seq, seq_len).clone(),
        domains=torch.arange(n_seq) % 3,
    )
    result = example.diff_pair(
        dense, moe, tokens, tmp_path, expansion=4, k=8, cc_steps=30, cc_batch_size=64,
        progress=False,
    )  # fmt: skip
    store = result["store"]
    assert store.manifest["experts"]["hooks"] == ["blocks.7.mlp.hook_expert_indices"]
    assert store.manifest["experts"]["model"] == "olmoe"
    experts = store.read_metadata()["experts"]
    assert experts.shape[1] == TOP_K and int(experts.min()) >= 0 and int(experts.max()) < N_EXPERTS
    assert math.isfinite(result["metrics"]["fve"])  # 30 steps: a smoke run, not a good fit
    assert sum(result["summary"]["class_counts"].values()) == 4 * D_MODEL
    assert result["paths"]["html"].exists()
