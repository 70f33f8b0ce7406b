"""Bring your own models: diff two checkpoints of one TransformerLens model.

Any two `HookedTransformer`s that share a tokenizer can be diffed. Here "your models" are two
checkpoints of a small model you train yourself (stock TransformerLens, no crossdiff model code):
checkpoint A after a few hundred steps, checkpoint B after more. The two share a residual basis, so
the crosscoder uses tied shared latents and the decoder cosines in the report are meaningful.

    python examples/bring_your_own_models.py --out runs/byo            # a few minutes on a CPU
    python examples/bring_your_own_models.py --out runs/byo --quick    # seconds (CI)

With your own models, skip step 1 and pass them to `harvest`, with a pairing preset naming the hook
of each (copy `hooks/single-layer.toml`).
"""

import argparse
import copy
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import crossdiff
from crossdiff.activations import harvest, load_pairing
from crossdiff.data import prepare_data


def train_steps(model: HookedTransformer, tokens: torch.Tensor, steps: int, seed: int) -> None:
    """A plain next-token training loop: whatever you used to train your own model."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = tokens[torch.randint(len(tokens), (16,), generator=g)]
        loss = model(batch, return_type="loss")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/byo"))
    parser.add_argument("--quick", action="store_true", help="a small run (seconds)")
    args = parser.parse_args()
    torch.manual_seed(0)
    chars, steps, n_tokens, cc_steps = (
        (100_000, 30, 8_000, 60) if args.quick else (600_000, 300, 100_000, 1_500)
    )

    # 1. Your models: two checkpoints of one small TransformerLens model.
    data = prepare_data(args.out / "data", source="embedded", n_chars_per_domain=chars)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=data.train.seq_len,
        d_vocab=data.tokenizer.vocab_size, act_fn="gelu", normalization_type="LN", seed=0,
    )  # fmt: skip
    model_a = HookedTransformer(cfg)
    train_steps(model_a, data.train.tokens, steps, seed=0)
    model_b = copy.deepcopy(model_a)
    train_steps(model_b, data.train.tokens, steps, seed=1)

    # 2. Paired activations at one hook point of each (the residual stream after block 0).
    store = harvest(
        model_a, model_b, data.train, load_pairing("single-layer"), args.out / "store",
        n_tokens=n_tokens, model_names=("early", "late"), tokenizer=data.tokenizer,
    )  # fmt: skip

    # 3. A crosscoder with designated shared latents tied across the two checkpoints.
    cc_cfg = crossdiff.CrossCoderConfig(
        n_models=2, d_model=store.d_model, d_sae=8 * store.d_model, k=16,
        n_shared=store.d_model, shared_decoder="tied", shared_penalty_ratio=0.7,
    )  # fmt: skip
    cc = crossdiff.train_crosscoder(store, cc_cfg, steps=cc_steps, batch_size=256)
    print(crossdiff.evaluate_crosscoder(cc, store, batch_size=256))

    # 4. Which latents are new in the later checkpoint, which it lost, and the report.
    diff = crossdiff.diff_features(cc, store, tokenizer=data.tokenizer)
    print(diff.summary["class_counts"])
    print(diff.latents("late-only").sort_values("density", ascending=False).head())
    paths = crossdiff.write_report(diff, args.out / "report")
    print("open", paths["html"])


if __name__ == "__main__":
    main()
