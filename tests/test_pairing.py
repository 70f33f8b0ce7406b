"""Pairing presets: the shipped ones, user files, and format errors."""

from __future__ import annotations

import pytest

from crossdiff.activations import Pairing, list_pairings, load_pairing
from crossdiff.activations.pairing import hook_layer, preset_dirs
from crossdiff.plumbing.common import CrossdiffError


def test_shipped_presets_are_found_by_name():
    assert {"paper", "mlp-all-layers", "single-layer"} <= set(list_pairings())
    assert any((d / "paper.toml").exists() for d in preset_dirs())


def test_paper_preset_is_the_residual_after_the_third_block():
    paper = load_pairing("paper")
    assert paper.sites == (("blocks.2.hook_resid_post", "blocks.2.hook_resid_post"),)
    assert paper.expert_indices == ("blocks.2.mlp.hook_expert_indices",)
    assert paper.drop_bos is True


def test_mlp_all_layers_expands_five_sites_in_layer_order():
    pairing = load_pairing("mlp-all-layers")
    assert pairing.hooks_a == tuple(f"blocks.{i}.hook_mlp_out" for i in range(5))
    assert pairing.hooks_b == pairing.hooks_a
    assert pairing.expert_indices == tuple(f"blocks.{i}.mlp.hook_expert_indices" for i in range(5))


def test_single_layer_template_has_no_placeholders():
    pairing = load_pairing("single-layer")
    assert pairing.sites == (("blocks.0.hook_resid_post", "blocks.0.hook_resid_post"),)


def test_unknown_name_lists_known_presets():
    with pytest.raises(CrossdiffError, match=r"unknown pairing preset 'papr'.*'paper'"):
        load_pairing("papr")
    with pytest.raises(CrossdiffError, match="not found"):
        load_pairing("nowhere/mine.toml")


def test_user_file_by_path_round_trips_through_the_manifest_dict(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        """
description = "attention out vs mlp out"
drop_bos = false
[[sites]]
a = "blocks.{L}.hook_attn_out"
b = "blocks.{L}.hook_mlp_out"
layers = [3, 1]
"""
    )
    pairing = load_pairing(path)
    assert pairing.name == "mine" and pairing.drop_bos is False
    assert pairing.sites == (
        ("blocks.3.hook_attn_out", "blocks.3.hook_mlp_out"),
        ("blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"),
    )
    assert Pairing.from_dict(pairing.to_dict()) == pairing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"', "at least one"),
        ('[[sites]]\na = "blocks.0.hook_resid_post"', "`a` and `b`"),
        ('[[sites]]\na = "x"\nb = "y"\nlayer = 2', "unknown keys.*'layer'"),
        ('[[sites]]\na = "blocks.{L}.hook_resid_post"\nb = "y"', "no `layers"),
        ('[[sites]]\na = "a"\nb = "b"\n[record]\nexpert_model = "c"', "expert_model"),
        ("[[sites]\n", "not valid TOML"),
    ],
)
def test_malformed_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(CrossdiffError, match=message):
        load_pairing(path)


def test_hook_layer():
    assert hook_layer("blocks.12.mlp.hook_expert_indices") == 12
    assert hook_layer("hook_embed") == -1
    assert hook_layer("ln_final.hook_normalized") is None
