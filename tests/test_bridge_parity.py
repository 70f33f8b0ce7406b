"""TransformerBridge parity: a Bridge's alias names (`blocks.1.hook_resid_post`) and its own names
(`blocks.1.hook_out`) through the spliced-in loss and logit effects, a Bridge MoE's experts read
from its router, and a TokenSet prepared with a Hugging Face tokenizer folder accepted for models
that carry that tokenizer (tiny random local checkpoints, tests/hf_folders.py)."""

from __future__ import annotations

import hf_folders as hf
import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

import crossdiff
from crossdiff.activations import Pairing, harvest
from crossdiff.analysis.logit_effects import logit_effects, residual_models
from crossdiff.crosscoder.spliced_loss import spliced_loss

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]
ALIAS = Pairing(name="alias", sites=(("blocks.1.hook_resid_post",) * 2,))
NATIVE = Pairing(name="native", sites=(("blocks.1.hook_out",) * 2,))
EXPERTS = Pairing(
    name="experts",
    sites=(("blocks.1.hook_resid_post",) * 2,),
    expert_indices=("blocks.0.mlp.hook_expert_indices", "blocks.1.mlp.hook_expert_indices"),
    expert_model="b",
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    dense, moe = hf.gpt2(0), hf.mixtral(1)
    folders = [hf.save(dense, root / "dense"), hf.save(moe, root / "moe")]
    bridges = tuple(TransformerBridge.boot_transformers(str(f)) for f in folders)
    return {"hf": (dense, moe), "folders": folders, "bridges": bridges}


@pytest.fixture(scope="module")
def trained(pair, tmp_path_factory) -> dict:
    tokens = hf.random_tokens(n_seq=40, seq_len=10)
    store = harvest(
        *pair["bridges"], tokens, ALIAS, tmp_path_factory.mktemp("s"), progress=False,
        model_names=("dense", "moe"),
    )  # fmt: skip
    cfg = crossdiff.CrossCoderConfig(d_model=hf.D_MODEL, d_sae=64, k=4)
    cc = crossdiff.train_crosscoder(store, cfg, steps=60, batch_size=64, log_every=10_000)
    return {"store": store, "cc": cc, "tokens": tokens}


def test_spliced_loss_takes_bridge_alias_and_native_names_alike(pair, trained):
    """The alias asked for is called with the Bridge's own name (the error this fixes: 'hook
    blocks.1.hook_resid_post ... gave None'); both names give one result, and splicing the
    reconstruction in changes the loss (it is spliced, not skipped)."""
    args = (trained["cc"], pair["bridges"], trained["tokens"][:8])
    by_alias = spliced_loss(*args, ALIAS, model_names=("dense", "moe"))
    by_name = spliced_loss(*args, NATIVE, model_names=("dense", "moe"))
    for name in ("dense", "moe"):
        a, b = by_alias["models"][name], by_name["models"][name]
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated"):
            assert a[key] == pytest.approx(b[key], rel=1e-6)
        assert a["ce_spliced"] != pytest.approx(a["ce_clean"], abs=1e-6)
        assert a["ce_zero_ablated"] != pytest.approx(a["ce_clean"], abs=1e-6)


def test_logit_effects_with_bridge_native_names_are_the_hf_unembedding(pair, trained):
    """`blocks.1.hook_out` is the residual stream: logit effects are made for it (before: dropped
    without a word) and equal the GPT-2's own ln_f (centred, times its weight) then lm_head."""
    manifest = {"hook_points": {"dense": ["blocks.1.hook_out"], "moe": ["blocks.1.hook_out"]}}
    hooks = residual_models(manifest, ["dense", "moe"])
    assert hooks == {"dense": "blocks.1.hook_out", "moe": "blocks.1.hook_out"}
    w_dec = trained["cc"].W_dec.detach()
    effects = logit_effects(w_dec, [0, 1], {"dense": pair["bridges"][0]}, ["dense", "moe"], k=3)
    dense = pair["hf"][0]
    d = w_dec[[0, 1], 0].float()
    want = ((d - d.mean(-1, keepdim=True)) * dense.transformer.ln_f.weight) @ dense.lm_head.weight.T
    for row, j in enumerate([0, 1]):
        top = effects[j]["dense"]["top"]
        values, ids = want[row].topk(3)
        assert [t for t, _ in top] == [str(int(i)) for i in ids] or len(top) == 3
        assert [v for _, v in top] == pytest.approx([round(float(v), 4) for v in values], abs=1e-3)


def test_bridge_moe_experts_are_its_routers_top_k(pair, tmp_path):
    """A Mixtral loaded as a Bridge has no hook_expert_indices; its experts are read from its
    router (`mlp.gate.hook_out`) and equal the top-2 of the Hugging Face router's logits (before:
    stored as -1), and the diff attributes latents to them."""
    tokens = hf.random_tokens(n_seq=40, seq_len=10, seed=3)
    store = harvest(*pair["bridges"], tokens, EXPERTS, tmp_path / "s", progress=False)
    assert store.manifest["experts"]["router_hooks"] == {
        f"blocks.{i}.mlp.hook_expert_indices": f"blocks.{i}.mlp.gate.hook_out" for i in (0, 1)
    }
    logits = {}
    moe = pair["hf"][1]
    handles = [
        moe.model.layers[i].mlp.gate.register_forward_hook(
            lambda mod, args, out, i=i: logits.__setitem__(i, out[0])
        )
        for i in (0, 1)
    ]
    with torch.no_grad():
        moe(tokens)
    for h in handles:
        h.remove()
    want = torch.cat([logits[i].topk(hf.TOP_K, -1).indices for i in (0, 1)], -1)
    want = want.reshape(*tokens.shape, -1)[:, 1:].reshape(-1, 2 * hf.TOP_K)
    meta = store.read_metadata()
    order = meta["doc_ids"].long() * (tokens.shape[1] - 1) + meta["positions"].long() - 1
    assert torch.equal(meta["experts"].long(), want[order])
    layout = store.manifest["experts"]["layout"]
    assert [(e["layer"], e["n_experts"]) for e in layout] == [(0, 4), (1, 4)]
    cfg = crossdiff.CrossCoderConfig(d_model=hf.D_MODEL, d_sae=32, k=4)
    cc = crossdiff.train_crosscoder(store, cfg, steps=40, batch_size=64, log_every=10_000)
    diff = crossdiff.diff_features(cc, store, show_progress=False, min_expert_firings=5)
    attributed = diff.table["top_expert"] >= 0
    assert attributed.sum() >= 5
    assert set(diff.table.loc[attributed, "top_expert"]) <= set(range(hf.N_EXPERTS))


def test_provenance_in_cfg_json_names_versions_classes_folders_and_no_machine_path(
    pair, trained, tmp_path
):
    """Before: model_class_name was always "HookedTransformer", dataset_path an absolute path,
    tokenizer_name null for own models, and no versions."""
    import json
    from importlib import metadata

    trained["cc"].save(tmp_path / "cc")
    meta = json.loads((tmp_path / "cc" / "cfg.json").read_text())["metadata"]
    assert meta["versions"] == {
        "crossdiff": crossdiff.__version__,
        "torch": metadata.version("torch"),
        "transformer_lens": metadata.version("transformer-lens"),
        "sae_lens": metadata.version("sae-lens"),
    }
    assert meta["model_class_name"] == "TransformerBridge"
    from crossdiff.activations.bridge import folder_fingerprint

    assert meta["model_sources"] == [
        {
            "class": "TransformerBridge",
            "folder_name": f.name,
            "folder_fingerprint": folder_fingerprint(f),
        }
        for f in pair["folders"]
    ]
    assert meta["tokenizer_name"] == "dense"  # the folder's name, not its path
    store = trained["store"]
    assert meta["dataset_path"] == "crossdiff-store:" + meta["store_fingerprint"]
    assert meta["store_name"] == store.path.name
    assert str(tmp_path.parent) not in json.dumps(meta)  # no path of this machine


def test_report_models_by_name_load_hf_folders(pair, trained):
    """`crossdiff report --models dense=FOLDER moe=FOLDER` (and ReportInputs / write_report with
    a dict): a Hugging Face folder loads as a Bridge, the one the store was harvested from."""
    from crossdiff.activations.identity import weights_hash
    from crossdiff.models.by_name import resolve_models
    from crossdiff.plumbing.common import CrossdiffError
    from crossdiff.report.commands import parse_models

    dense, moe = (str(f) for f in pair["folders"])
    given = parse_models([f"dense={dense}", f"moe={moe}"], ["dense", "moe"])
    assert given == {"dense": pair["folders"][0], "moe": pair["folders"][1]}
    assert str(parse_models(["runs/models"], ["dense", "moe"])) == "runs/models"
    with pytest.raises(CrossdiffError, match="NAME=FOLDER with NAME one of"):
        parse_models([f"big={dense}"], ["dense", "moe"])
    models = resolve_models(given, ["dense", "moe"], only=["moe"])
    assert list(models) == ["moe"] and type(models["moe"]).__name__ == "TransformerBridge"
    recorded = {m["name"]: m["weights_hash"] for m in trained["store"].manifest["models"]}
    assert weights_hash(models["moe"]) == recorded["moe"]
