"""Train a small crosscoder on planted data: run by the DDP tests under torchrun (N ranks) and as a
plain script (one process). Each rank writes its final weights, threshold and dead-latent counters
and the logged curve to OUT/rank_R.safetensors / rank_R.json.

    python train_crosscoder.py OUT STEPS [CHECKPOINT_DIR]
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import crossdiff.crosscoder.train as trainer_module
from crossdiff.crosscoder import CrossCoderConfig, train_crosscoder
from crossdiff.crosscoder.synthetic import planted_crosscoder_data
from crossdiff.plumbing.distributed import dist_info, distributed_job


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    checkpoint_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    acts, _ = planted_crosscoder_data(4096, 16, 12, 6, 6, seed=0, densities=(0.05, 0.2))
    cfg = CrossCoderConfig(d_model=16, d_sae=64, k=4)

    final_trainer = {}
    real_fit = trainer_module.CrossCoderTrainer.fit

    def fit_and_keep(self):
        final_trainer["t"] = self
        return real_fit(self)

    trainer_module.CrossCoderTrainer.fit = fit_and_keep
    if "STOP_AFTER_STEPS" in os.environ:  # simulate a crash: every rank fails at the same step
        real_step = trainer_module.CrossCoderTrainer._train_step
        stop_after = int(os.environ["STOP_AFTER_STEPS"])

        def failing_step(self, sae, sae_in):
            if self.n_training_steps >= stop_after:
                raise SystemExit(3)
            return real_step(self, sae, sae_in)

        trainer_module.CrossCoderTrainer._train_step = failing_step
    with distributed_job() as info:
        cc = train_crosscoder(
            acts, cfg, steps=steps, batch_size=128, lr=3e-3, seed=1, log_every=1,
            dead_after_tokens=1024, aux_loss_coefficient=0.25, checkpoint_dir=checkpoint_dir,
            checkpoint_every=10,
        )  # fmt: skip
        trainer = final_trainer["t"]
        tensors = {k: v.detach().contiguous() for k, v in cc.state_dict().items()}
        tensors["dead_counters"] = trainer.n_forward_passes_since_fired.contiguous()
        tensors["act_freq_scores"] = trainer.act_freq_scores.contiguous()
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / f"rank_{info.rank}.safetensors"))
        summary = {"history": cc.training_summary["history"], "world": dist_info().world_size}
        (out / f"rank_{info.rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
