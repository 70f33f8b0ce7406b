"""Bring your own models: diff a HookedTransformer and a Hugging Face model via TransformerBridge.

Any two TransformerLens models that share a tokenizer can be diffed: `HookedTransformer`s,
`TransformerBridge`s (TransformerLens's wrapper around a Hugging Face model), or one of each. Here
"your models" are two small language models you train yourself on the same tokens: model A a
stock `HookedTransformer`, model B a Hugging Face GPT-2 saved to a folder and loaded with
`TransformerBridge.boot_transformers` (as you would load your own checkpoint or a hub model). The
tokens are a plain LongTensor [n_seq, seq_len] with one domain label per row.

    python examples/bring_your_own_models.py --out runs/byo            # a few minutes on a CPU
    python examples/bring_your_own_models.py --out runs/byo --quick    # seconds (CI)

With your own models, skip step 1: step 2 is all you need (the same code as the README's "Bring
your own models" snippet), with the hook names of your models in the pairing.
"""

import argparse
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from crossdiff.data import prepare_data


def train_steps(model: torch.nn.Module, tokens: torch.Tensor, steps: int, seed: int) -> None:
    """A plain next-token training loop: whatever you used to train your own model."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = tokens[torch.randint(len(tokens), (16,), generator=g)]
        if isinstance(model, HookedTransformer):
            loss = model(batch, return_type="loss")
        else:  # a Hugging Face causal LM
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def diff_your_models(
    model_a: Any,
    hf_folder: Path,
    tokens: torch.Tensor,
    domains: torch.Tensor | None,
    domain_names: list[str] | None,
    out: Path,
    steps: int,
) -> dict[str, Path]:
    """Step 2: the README's "Bring your own models" snippet, line for line."""
    # --- README snippet begins
    from transformer_lens.model_bridge import TransformerBridge

    import crossdiff
    from crossdiff.activations import Pairing, harvest

    # model_a: any HookedTransformer; model_b: any Hugging Face model (a local folder or a hub name)
    model_b = TransformerBridge.boot_transformers(str(hf_folder))
    # tokens: LongTensor [n_seq, seq_len] of the tokenizer both share; domains: one per row, or None
    pairing = Pairing(name="resid-1", sites=(("blocks.1.hook_resid_post",) * 2,))
    store = harvest(
        model_a, model_b, tokens, pairing, out / "store",
        model_names=("hooked", "hf"), domains=domains, domain_names=domain_names,
    )  # fmt: skip
    cfg = crossdiff.CrossCoderConfig(d_model=store.d_model, d_sae=8 * store.d_model, k=16)
    cc = crossdiff.train_crosscoder(store, cfg, steps=steps, batch_size=256)
    diff = crossdiff.diff_features(cc, store, tokenizer=model_b.tokenizer)
    print(diff.summary["class_counts"])  # shared, hooked-only, hf-only, ...
    paths = crossdiff.write_report(diff, out / "report")
    # --- README snippet ends
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/byo"))
    parser.add_argument("--quick", action="store_true", help="a small run (seconds)")
    args = parser.parse_args()
    torch.manual_seed(0)
    chars, steps, cc_steps = (100_000, 30, 60) if args.quick else (600_000, 300, 1_500)

    # 1. Your models: a HookedTransformer and a Hugging Face GPT-2, trained on the same tokens.
    data = prepare_data(args.out / "data", source="embedded", n_chars_per_domain=chars)
    vocab, seq_len = data.tokenizer.vocab_size, data.train.seq_len
    model_a = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=seq_len,
            d_vocab=vocab, act_fn="gelu", normalization_type="LN", seed=0,
        )
    )  # fmt: skip
    train_steps(model_a, data.train.tokens, steps, seed=0)
    hf_model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=seq_len, vocab_size=vocab)
    )
    train_steps(hf_model, data.train.tokens, steps, seed=1)
    hf_folder = args.out / "hf_model"
    hf_model.save_pretrained(hf_folder)
    bos = data.tokenizer.bos_token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=data.tokenizer.backend, bos_token=bos, eos_token=bos
    )
    tokenizer.save_pretrained(hf_folder)

    # 2. Diff them on plain token rows, each row labelled with its text domain.
    rows = data.train.subset(slice(0, 400 if args.quick else 4_000))
    paths = diff_your_models(
        model_a, hf_folder, rows.tokens, rows.domains, list(rows.domain_names), args.out, cc_steps
    )
    print("open", paths["html"])


if __name__ == "__main__":
    main()
