"""CrossdiffMoE: drop-in equivalence with TransformerLens's MoE, hooks, patching, aux losses."""

import math
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer
from transformer_lens.components.mlps.moe import MoE

from crossdiff.models import CrossdiffMoE, build_model, moe_aux_loss, moe_config
from crossdiff.plumbing.common import CrossdiffError

SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_vocab=64, n_ctx=16, num_experts=4, device="cpu")
HOOKS = (
    "hook_router_logits",
    "hook_expert_weights",
    "hook_expert_indices",
    "hook_topk_weights",
    "hook_topk_indices",
    "hook_expert_out",
)


def stock_model(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(cfg)


@pytest.fixture
def cfg():
    return moe_config("tiny", **SMALL)


@pytest.fixture
def tokens():
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_state_dicts_move_both_ways_with_the_same_logits(tokens, norm_topk_prob):
    cfg = moe_config("tiny", **SMALL, norm_topk_prob=norm_topk_prob)
    torch.manual_seed(0)
    ours = build_model(cfg)
    torch.manual_seed(1)  # different weights, so the comparison is not trivially equal
    stock = stock_model(cfg)
    assert isinstance(stock.blocks[0].mlp, MoE)
    assert isinstance(ours.blocks[0].mlp, CrossdiffMoE)

    stock.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(stock(tokens), ours(tokens), atol=1e-5, rtol=0)

    torch.manual_seed(2)
    stock2 = stock_model(cfg)
    ours.load_state_dict(stock2.state_dict(), strict=True)
    torch.testing.assert_close(ours(tokens), stock2(tokens), atol=1e-5, rtol=0)
    assert not torch.allclose(stock(tokens), stock2(tokens), atol=1e-3)


def test_build_model_keeps_the_stock_initialisation(cfg):
    torch.manual_seed(5)
    ours = build_model(cfg)
    torch.manual_seed(5)
    stock = stock_model(cfg)
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), stock.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_hooks_have_the_documented_shapes_and_sum_to_the_output(cfg, tokens):
    model = build_model(cfg)
    names = [f"blocks.{layer}.mlp.{hook}" for layer in range(2) for hook in HOOKS]
    assert set(names) <= set(model.hook_dict)
    wanted = set(names) | {"blocks.1.hook_mlp_out"}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    assert set(cache.keys()) == wanted
    b, p, k, e, d = 3, 12, 2, 4, 32
    assert cache["blocks.1.mlp.hook_router_logits"].shape == (b, p, e)
    # stock names keep stock TransformerLens's tensors: the softmax over all experts, flat
    assert cache["blocks.1.mlp.hook_expert_weights"].shape == (b * p, e)
    assert cache["blocks.1.mlp.hook_expert_indices"].shape == (b * p, k)
    assert cache["blocks.1.mlp.hook_topk_weights"].shape == (b, p, k)
    assert cache["blocks.1.mlp.hook_topk_indices"].shape == (b, p, k)
    assert cache["blocks.1.mlp.hook_expert_out"].shape == (b, p, k, d)
    torch.testing.assert_close(
        cache["blocks.1.mlp.hook_expert_out"].sum(dim=2), cache["blocks.1.hook_mlp_out"]
    )
    # the top-k weights are the top-k of the softmax over the router logits
    probs = cache["blocks.1.mlp.hook_router_logits"].softmax(dim=-1)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_expert_weights"], probs.reshape(b * p, e))
    top = probs.topk(k, dim=-1)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_topk_weights"], top.values)
    assert torch.equal(cache["blocks.1.mlp.hook_topk_indices"], top.indices)
    assert torch.equal(cache["blocks.1.mlp.hook_expert_indices"], top.indices.reshape(b * p, k))


def test_grouped_dispatch_matches_a_per_token_reference(cfg, tokens):
    model = build_model(cfg)
    moe = model.blocks[0].mlp
    x = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(3))
    out = moe(x)
    flat = x.reshape(-1, 32)
    probs = torch.softmax(moe.W_gate(flat), dim=-1)
    weights, indices = probs.topk(2, dim=-1)
    expected = torch.stack(
        [
            sum(w * moe.experts[int(i)](row[None])[0] for w, i in zip(ws, idx, strict=True))
            for row, ws, idx in zip(flat, weights, indices, strict=True)
        ]
    )
    torch.testing.assert_close(out.reshape(-1, 32), expected, atol=1e-5, rtol=1e-5)


def test_patching_expert_out_changes_the_block_output(cfg, tokens):
    model = build_model(cfg)
    captured = {}

    def drop_second_expert(value, hook):
        value = value.clone()
        value[:, :, 1] = 0.0
        captured["patched"] = value
        return value

    def save_mlp_out(value, hook):
        captured["mlp_out"] = value

    clean = model(tokens)
    patched = model.run_with_hooks(
        tokens,
        fwd_hooks=[
            ("blocks.0.mlp.hook_expert_out", drop_second_expert),
            ("blocks.0.hook_mlp_out", save_mlp_out),
        ],
    )
    torch.testing.assert_close(captured["mlp_out"], captured["patched"][:, :, 0])
    assert not torch.allclose(clean, patched, atol=1e-4)


def test_patching_expert_indices_reroutes_tokens(cfg, tokens):
    model = build_model(cfg)
    moe = model.blocks[0].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    moe.hook_expert_indices.add_hook(lambda value, hook: torch.full_like(value, 3))
    try:
        out = moe(x)
    finally:
        moe.hook_expert_indices.remove_hooks()
    weights = torch.softmax(moe.W_gate(x), dim=-1).topk(2, dim=-1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(out, weights * moe.experts[3](x.reshape(-1, 32)).reshape(2, 5, 32))


def test_aux_losses_on_a_planted_router(cfg):
    moe = CrossdiffMoE(cfg, load_balance_coef=0.5, z_loss_coef=0.25)
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.W_gate.weight.zero_()
    moe(x)
    # uniform router: mean probability 1/E everywhere, so the Switch loss is exactly 1;
    # logsumexp of E zeros is log E
    assert moe.last_load_balance_loss.item() == pytest.approx(1.0)
    assert moe.last_z_loss.item() == pytest.approx(math.log(4) ** 2)
    assert moe.last_aux_loss.item() == pytest.approx(0.5 + 0.25 * math.log(4) ** 2)

    with torch.no_grad():  # every token strongly prefers experts 0 and 1: collapse
        moe.W_gate.weight.zero_()
        x = torch.ones(4, 6, 32)
        moe.W_gate.weight[:2] = 1.0
    moe(x)
    # slots: half to expert 0, half to 1; mean probs ~ (0.5, 0.5, 0, 0): loss ~ E * 0.5 = 2
    assert moe.last_load_balance_loss.item() == pytest.approx(2.0, abs=1e-3)


def test_moe_aux_loss_sums_layers_and_trains_the_router(cfg, tokens):
    model = build_model(cfg, load_balance_coef=0.01, z_loss_coef=0.001)
    assert moe_aux_loss(model).item() == 0.0  # nothing run yet
    model(tokens)
    layers = [block.mlp for block in model.blocks]
    expected = sum(m.last_aux_loss for m in layers)
    torch.testing.assert_close(moe_aux_loss(model), expected)
    moe_aux_loss(model).backward()
    assert all(m.W_gate.weight.grad.abs().sum() > 0 for m in layers)


def test_impossible_expert_counts_are_refused(cfg):
    from dataclasses import replace

    bad = replace(cfg, experts_per_token=5)
    with pytest.raises(CrossdiffError, match="experts_per_token <= num_experts"):
        CrossdiffMoE(bad)


def _stock_and_ours(cfg, seed=0):
    torch.manual_seed(seed)
    stock = MoE(cfg)
    ours = CrossdiffMoE(cfg)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def _assert_same_outputs_and_grads(stock, ours, x, x_needs_grad=True):
    xs, xo = x.clone().requires_grad_(x_needs_grad), x.clone().requires_grad_(x_needs_grad)
    out_s, out_o = stock(xs), ours(xo)
    torch.testing.assert_close(out_o, out_s, atol=1e-5, rtol=0)
    out_s.square().mean().backward()
    out_o.square().mean().backward()
    if x_needs_grad:
        torch.testing.assert_close(xo.grad, xs.grad, atol=1e-5, rtol=0)
    stock_grads = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, stock_grads[name].grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("x_needs_grad", [True, False])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_fast_path_matches_stock_outputs_and_gradients(x_needs_grad, norm_topk_prob):
    cfg = moe_config("tiny", **SMALL, norm_topk_prob=norm_topk_prob)
    stock, ours = _stock_and_ours(cfg)
    x = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(6))
    assert ours._fast_path_ok(x, [p for p in ours.experts.parameters()])
    _assert_same_outputs_and_grads(stock, ours, x, x_needs_grad)


def test_experts_without_tokens_get_zero_gradients_as_in_stock(cfg):
    stock, ours = _stock_and_ours(cfg)
    for moe in (stock, ours):  # route every slot to expert 3: experts 0-2 get no tokens
        moe.hook_expert_indices.add_hook(lambda value, hook: torch.full_like(value, 3))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    _assert_same_outputs_and_grads(stock, ours, x)
    assert all(p.grad.abs().max() == 0 for p in ours.experts[0].parameters())


def test_hooks_inside_experts_take_the_module_path_with_the_same_result(cfg):
    _, ours = _stock_and_ours(cfg)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(8))
    fast = ours(x)
    seen = []
    ours.experts[1].hook_pre.add_hook(lambda value, hook: seen.append(value.shape))
    assert not ours._fast_path_ok(x, [p for p in ours.experts.parameters()])
    torch.testing.assert_close(ours(x), fast, atol=1e-6, rtol=0)
    assert seen and seen[0][1] == cfg.d_mlp  # [tokens routed to expert 1, d_mlp]


def test_other_activations_and_autocast_take_the_module_path(cfg):
    from dataclasses import replace

    stock, ours = _stock_and_ours(replace(cfg, act_fn="gelu"))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(9))
    assert not ours._fast_path_ok(x, [p for p in ours.experts.parameters()])
    _assert_same_outputs_and_grads(stock, ours, x)

    _, ours = _stock_and_ours(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ours._fast_path_ok(x, [p for p in ours.experts.parameters()])
        out = ours(x)
    out.float().sum().backward()
    assert ours.experts[0].W_in.weight.grad.dtype == torch.float32
