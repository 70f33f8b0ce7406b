"""Your own dense model against your own MoE: Hugging Face checkpoints run as TransformerBridges.

A researcher's models are often Hugging Face folders: here a GPT-2-like dense model and a
Mixtral-like MoE (4 experts, top-2), random weights, saved with `save_pretrained` with one tokenizer
and loaded with `TransformerBridge.boot_transformers` (as you would load your own checkpoints). The
script then does what you would do with yours:

1. token rows with the models' own tokenizer: `prepare_data(tokenizer=<the model folder>)`;
2. a paired harvest at the residual stream after block 1 (the alias name `blocks.1.hook_resid_post`
   of the Bridge's `blocks.1.hook_out`), with the MoE's routed experts read from its router hooks
   (a Bridge MoE has no `hook_expert_indices`; crossdiff reads `blocks.{L}.mlp.gate.hook_out`);
3. a crosscoder, and the report with the models you name (spliced-in loss, logit effects) and
   expert attribution per latent.

    python examples/bridge_dense_vs_moe.py --out runs/bridge            # about a minute on a CPU
    python examples/bridge_dense_vs_moe.py --out runs/bridge --quick    # seconds (CI)
"""

import argparse
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)

import crossdiff
from crossdiff.activations import Pairing, harvest
from crossdiff.data import prepare_data
from crossdiff.report.stage import ReportInputs, ReportStageConfig, run_report_stage

D_MODEL, N_LAYERS, N_EXPERTS, TOP_K = 64, 2, 4, 2


def save_your_models(out: Path, chars: int) -> dict[str, Path]:
    """Stand-ins for your checkpoints: a tokenizer, and two random models saved with it."""
    tokenizer_data = prepare_data(
        out / "tokenizer_data", source="embedded", n_chars_per_domain=chars
    )
    bos = tokenizer_data.tokenizer.bos_token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_data.tokenizer.backend, bos_token=bos, eos_token=bos
    )
    vocab = tokenizer_data.tokenizer.vocab_size
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(
        GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=4, n_positions=128, vocab_size=vocab)
    )
    moe = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=96, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, num_key_value_heads=4, num_local_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K, max_position_embeddings=128,
        )
    )  # fmt: skip
    folders = {"dense": out / "hf" / "dense", "moe": out / "hf" / "moe"}
    for name, model in (("dense", dense), ("moe", moe)):
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bridge"))
    parser.add_argument("--quick", action="store_true", help="a small run (seconds)")
    args = parser.parse_args()
    chars, n_rows, steps = (40_000, 120, 150) if args.quick else (300_000, 2_000, 1_500)
    folders = save_your_models(args.out, chars)

    # --- with your own models, start here
    from transformer_lens.model_bridge import TransformerBridge

    dense = TransformerBridge.boot_transformers(str(folders["dense"]))
    moe = TransformerBridge.boot_transformers(str(folders["moe"]))
    # 1. token rows with the models' own tokenizer (the folder's tokenizer.json)
    data = prepare_data(
        args.out / "data", source="embedded", n_chars_per_domain=chars, seq_len=64,
        tokenizer=folders["dense"],
    )  # fmt: skip
    rows = data.train.subset(slice(0, min(n_rows, len(data.train))))
    # 2. the paired harvest, the MoE's experts at every layer from its router
    pairing = Pairing(
        name="bridge-resid-1",
        sites=(("blocks.1.hook_resid_post",) * 2,),
        expert_indices=tuple(f"blocks.{i}.mlp.hook_expert_indices" for i in range(N_LAYERS)),
        expert_model="b",
    )
    store = harvest(dense, moe, rows, pairing, args.out / "store", model_names=("dense", "moe"))
    print("experts read from", store.manifest["experts"].get("router_hooks"))
    # 3. the crosscoder and the report, with the models named for splicing and logit effects
    cfg = crossdiff.CrossCoderConfig(d_model=store.d_model, d_sae=8 * store.d_model, k=16)
    cc = crossdiff.train_crosscoder(store, cfg, steps=steps, batch_size=256)
    inputs = ReportInputs(
        cc, store, data.tokenizer, models_dir={"dense": dense, "moe": moe}, heldout=data.heldout
    )
    config = ReportStageConfig(splice_sequences=8 if args.quick else 64, min_expert_firings=10)
    diff, paths = run_report_stage(config, inputs, args.out / "report")
    # --- end

    attributed = diff.table[diff.table["top_expert"] >= 0]
    print(diff.summary["class_counts"])
    print(f"{len(attributed)} latents attributed to an expert; top experts per latent class:")
    print(attributed.groupby("class")["top_expert"].value_counts().to_string())
    if attributed.empty:
        raise SystemExit("no latent was attributed to an expert: the MoE's routing was not read")
    print("open", paths["html"])


if __name__ == "__main__":
    main()
