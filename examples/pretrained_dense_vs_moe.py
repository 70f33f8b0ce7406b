"""Diff a pretrained dense model and a pretrained MoE: OLMo-1B vs OLMoE-1B-7B.

The real-world version of crossdiff's question. The two models share a tokenizer (OLMo's
GPT-NeoX-based vocabulary of 50,304 ids) and a width (2048), and both have 16 layers. The script
loads both with `HookedTransformer.from_pretrained`, swaps crossdiff's MoE into OLMoE (same
weights and outputs, plus the router/top-k/expert-output hooks), harvests the residual stream after
block 7 of each (`hooks/olmo-vs-olmoe.toml`, with OLMoE's selected experts per token), trains a
BatchTopK crosscoder and writes the report.

Needs Hugging Face Hub access and a GPU (OLMoE in float32 is about 28 GB, OLMo-1B about 5 GB):

    python examples/pretrained_dense_vs_moe.py --out runs/olmo --device cuda
    python examples/pretrained_dense_vs_moe.py --out runs/olmo --corpus embedded --n-tokens 200000

Other pairs that share a tokenizer work the same way: pass `--dense` and `--moe` Hub names and a
pairing preset (`--pairing my.toml`, a copy of hooks/olmo-vs-olmoe.toml with your hooks).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

import crossdiff
from crossdiff.activations import harvest, load_pairing
from crossdiff.models import swap_in_crossdiff_moe
from crossdiff.plumbing.common import CrossdiffError

DENSE, MOE = "allenai/OLMo-1B-hf", "allenai/OLMoE-1B-7B-0924"


def load_pair(
    dense_name: str, moe_name: str, device: str, dtype: str
) -> tuple[HookedTransformer, HookedTransformer]:
    """Both models from the Hub, crossdiff's MoE swapped into the MoE (needs hub access)."""
    dense = HookedTransformer.from_pretrained(dense_name, device=device, dtype=dtype)
    moe = HookedTransformer.from_pretrained(moe_name, device=device, dtype=dtype)
    check_same_tokenizer(dense, moe)
    return dense.eval(), swap_in_crossdiff_moe(moe).eval()


def check_same_tokenizer(dense: HookedTransformer, moe: HookedTransformer) -> None:
    """A crosscoder pairs the two models token by token, so their vocabularies must agree."""
    vocab_a, vocab_b = dense.tokenizer.get_vocab(), moe.tokenizer.get_vocab()
    if vocab_a != vocab_b:
        differ = sorted(set(vocab_a.items()) ^ set(vocab_b.items()))[:5]
        raise CrossdiffError(
            f"{dense.cfg.model_name} and {moe.cfg.model_name} do not share a tokenizer "
            f"(e.g. {differ}); pick a dense/MoE pair trained with the same vocabulary"
        )


def diff_pair(
    dense: HookedTransformer,
    moe: HookedTransformer,
    tokens: Any,
    out: Path,
    *,
    pairing: str | Path = "olmo-vs-olmoe",
    n_tokens: int | None = None,
    expansion: int = 8,
    k: int = 64,
    shared_fraction: float = 0.1,
    cc_steps: int = 3000,
    batch_size: int = 16,
    cc_batch_size: int = 4096,
    device: str = "cpu",
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Harvest, train a crosscoder, evaluate, diff and report; the part that needs no hub."""
    store = harvest(
        dense, moe, tokens, load_pairing(pairing), out / "store", n_tokens=n_tokens,
        batch_size=batch_size, model_names=("olmo", "olmoe"), tokenizer=tokenizer,
        progress=progress,
    )  # fmt: skip
    d_sae = expansion * store.d_model
    cfg = crossdiff.CrossCoderConfig(
        n_models=2, d_model=store.d_model, d_sae=d_sae, k=k,
        n_shared=int(shared_fraction * d_sae), shared_decoder="free",
    )  # fmt: skip
    cc = crossdiff.train_crosscoder(
        store, cfg, steps=cc_steps, batch_size=cc_batch_size, device=device
    )
    metrics = crossdiff.evaluate_crosscoder(cc, store, batch_size=cc_batch_size)
    diff = crossdiff.diff_features(cc, store, tokenizer=tokenizer)
    paths = crossdiff.write_report(diff, out / "report", quiet=not progress)
    return {"metrics": metrics, "summary": diff.summary, "paths": paths, "store": store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/olmo-vs-olmoe"))
    parser.add_argument("--dense", default=DENSE)
    parser.add_argument("--moe", default=MOE)
    parser.add_argument("--pairing", default="olmo-vs-olmoe")
    parser.add_argument("--corpus", default="hf", choices=["hf", "embedded"])
    parser.add_argument("--n-tokens", type=int, default=2_000_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--cc-steps", type=int, default=3000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", help="float32 is advised for MoE routing")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device; pass --device cpu (slow: OLMoE has 7B parameters)")

    dense, moe = load_pair(args.dense, args.moe, args.device, args.dtype)
    data = crossdiff.prepare_data(
        args.out / "data", source=args.corpus, tokenizer=args.moe, seq_len=args.seq_len
    )
    result = diff_pair(
        dense, moe, data.train, args.out, pairing=args.pairing, n_tokens=args.n_tokens,
        cc_steps=args.cc_steps, device=args.device, tokenizer=data.tokenizer,
    )  # fmt: skip
    print({key: result["metrics"][key] for key in ("fve", "fve_per_model", "l0")})
    print(result["summary"]["class_counts"])
    print("open", result["paths"]["html"])


if __name__ == "__main__":
    main()
