"""Train a small crosscoder from live activations of two tiny models: run by the live-source DDP
test under torchrun (N ranks) and as a plain script (one process). Each rank writes its final
weights trained from the live source and from a store of the same harvest (OUT/live_rank_R and
OUT/store_rank_R .safetensors) and how many shards it ran the models on (OUT/rank_R.json).

    python train_live.py OUT STEPS
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crossdiff.activations import harvest
from crossdiff.activations.live import LiveActivations
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
from crossdiff.plumbing.distributed import distributed_job, main_process_first


def tiny(seed: int, moe: bool) -> HookedTransformer:
    fields = dict(n_layers=3, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_mlp=24, d_vocab=40,
                  act_fn="gelu", seed=seed)  # fmt: skip
    if moe:
        fields.update(act_fn="silu", gated_mlp=True, num_experts=4, experts_per_token=2)
    return HookedTransformer(HookedTransformerConfig(**fields)).eval()


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    tokens = torch.randint(1, 40, (60, 9), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    with distributed_job() as info:
        models = (tiny(0, False), tiny(1, True))
        split = dict(batch_size=4, shard_tokens=40, heldout_fraction=0.2, split_seed=1)
        with main_process_first():  # the reference: a store harvested by one process
            store = harvest(*models, tokens, "paper", out / "store", progress=False,
                            distributed=False, **split)  # fmt: skip
        live = LiveActivations(*models, tokens, "paper", **split)
        cfg = CrossCoderConfig(d_model=16, d_sae=32, k=4)
        kw = dict(steps=steps, batch_size=32, lr=1e-3, seed=2)
        for name, source in (("live", live), ("store", store)):
            cc = train_crosscoder(source, cfg, **kw)
            tensors = {k: v.detach().contiguous() for k, v in cc.state_dict().items()}
            save_file(tensors, str(out / f"{name}_rank_{info.rank}.safetensors"))
        report = {"shards_computed": live.shards_computed, "n_shards": live.n_shards}
        (out / f"rank_{info.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
