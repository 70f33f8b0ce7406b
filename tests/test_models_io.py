"""Model folders: save/load round trip, stock TransformerLens compatibility, bad checkpoints."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer

from crossdiff.models import (
    CrossdiffMoE,
    build_model,
    dense_config,
    load_model,
    moe_config,
    save_model,
)
from crossdiff.models.io import config_from_dict
from crossdiff.plumbing.common import CrossdiffError

SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_vocab=64, n_ctx=16, device="cpu")


@pytest.mark.parametrize("moe", [False, True])
def test_save_then_load_gives_the_same_model(tmp_path, moe):
    cfg = moe_config("tiny", **SMALL, num_experts=4) if moe else dense_config("tiny", **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg, load_balance_coef=0.02, z_loss_coef=0.003)
    save_model(model, tmp_path / "m")
    header = json.loads((tmp_path / "m" / "config.json").read_text())  # plain JSON
    assert header["config"]["d_model"] == 32 and header["config"]["dtype"] == "float32"
    loaded = load_model(tmp_path / "m")
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(tokens), model.eval()(tokens), atol=0, rtol=0)
    assert loaded.cfg.num_experts == cfg.num_experts
    if moe:
        assert isinstance(loaded.blocks[1].mlp, CrossdiffMoE)
        assert loaded.blocks[1].mlp.load_balance_coef == 0.02
        assert loaded.blocks[1].mlp.z_loss_coef == 0.003


def test_a_saved_moe_loads_into_stock_transformer_lens(tmp_path):
    cfg = moe_config("tiny", **SMALL, num_experts=4)
    model = build_model(cfg)
    save_model(model, tmp_path)
    header = json.loads((tmp_path / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        stock = HookedTransformer(config_from_dict(header["config"], device="cpu"))
    stock.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(stock(tokens), model(tokens), atol=1e-5, rtol=0)


def test_weights_from_another_config_name_the_mismatched_tensors(tmp_path):
    save_model(build_model(dense_config("tiny", **SMALL, d_mlp=64)), tmp_path)
    header = json.loads((tmp_path / "config.json").read_text())
    header["config"]["d_mlp"] = 48
    (tmp_path / "config.json").write_text(json.dumps(header))
    with pytest.raises(CrossdiffError, match=r"blocks\.0\.mlp\.W_in: checkpoint \(32, 64\) vs"):
        load_model(tmp_path)


def test_dense_weights_in_an_moe_folder_list_missing_tensors(tmp_path):
    save_model(build_model(dense_config("tiny", **SMALL)), tmp_path / "dense")
    save_model(build_model(moe_config("tiny", **SMALL, num_experts=4)), tmp_path / "moe")
    (tmp_path / "moe" / "model.safetensors").write_bytes(
        (tmp_path / "dense" / "model.safetensors").read_bytes()
    )
    with pytest.raises(CrossdiffError, match="missing tensors: .*experts"):
        load_model(tmp_path / "moe")


def test_missing_or_foreign_folders_are_explained(tmp_path):
    with pytest.raises(CrossdiffError, match="model config not found"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 3}))
    with pytest.raises(CrossdiffError, match="not a crossdiff model config"):
        load_model(tmp_path)
