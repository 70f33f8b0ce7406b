"""The options of each `crossdiff run` preset, per stage (and the run-wide sections).

Each stage's options are a dict because a run's stage records fingerprint that dict
(crossdiff.run.stage_record); `<stage package>.stage.<Stage>StageConfig.from_options` turns one
into the stage's typed config, refusing unknown names. The stage subcommands take the same options
with `--preset` (crossdiff/plumbing/preset_args.py).
"""

from __future__ import annotations

from typing import Any

# Options per preset and stage. `micro` is the reduced size the tests and CI examples run.
RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "data": {"source": "embedded", "preset": "tiny"},
        "models": {"preset": "tiny"},
        # the convergence study (docs/findings.md, "Convergence"): the whole tiny corpus in the
        # store (1.8M training tokens), 16x the old crosscoder steps (10.8 passes), k 8 and 512
        # latents took seed stability from 4% to 53% of live latents at cosine 0.7 (the TopK SAE
        # anchor is about half), at FVE 0.966 and 3% dead; designated shared latents did not
        # raise it (n_shared stays 0)
        "store": {
            "pairing": "paper",
            "n_tokens": 2_000_000,
            "dtype": "float16",
            "heldout_fraction": 0.1,
        },
        "crosscoder": {
            "expansion": 4,
            "k": 8,
            "n_shared": 0,
            "shared_decoder": "free",
            "steps": 19_200,
            "batch_size": 1024,
            # 1/32 (the anchors' weight) leaves a third of the latents dead in a short run; 0.25
            # brings that to a few % at the same FVE (measured on the tiny store)
            "aux_loss_coefficient": 0.25,
        },
        "report": {"split": "paper", "max_tokens": 200_000},
    },
    # tiny's corpus and tokenizer, a larger and longer-trained pair (d_model 256), three model
    # seeds; the crosscoder by tiny's rule from the convergence study (the whole corpus in the
    # store, 19,200 steps, k 8, 4x d_model latents), not yet measured at this size
    "small": {
        "data": {"source": "embedded", "preset": "tiny"},
        "models": {"preset": "small"},
        "store": {
            "pairing": "paper",
            "n_tokens": 2_000_000,
            "dtype": "float16",
            "heldout_fraction": 0.1,
        },
        "crosscoder": {
            "expansion": 4,
            "k": 8,
            "n_shared": 0,
            "shared_decoder": "free",
            "steps": 19_200,
            "batch_size": 1024,
            "aux_loss_coefficient": 0.25,  # as tiny: keeps the dead fraction low
        },
        "report": {"split": "paper", "max_tokens": 200_000},
        "model_seeds": {"n": 3},
    },
    "micro": {
        "data": {"source": "embedded", "preset": "tiny", "n_chars_per_domain": 150_000},
        "models": {"preset": "tiny", "steps": 30, "checkpoint_every": 10, "eval_rows": 16},
        "store": {
            "pairing": "paper",
            "n_tokens": 12_000,
            "dtype": "float16",
            "heldout_fraction": 0.1,
        },
        "crosscoder": {
            "expansion": 4,
            "k": 8,
            "steps": 60,
            "batch_size": 256,
            "checkpoint_every": 20,
        },
        # screen-and-verify kept small: 2 candidates per exclusive class on 8 held-out rows
        "report": {
            "split": "paper",
            "max_tokens": 12_000,
            "verify_candidates": 2,
            "verify_sequences": 8,
        },
    },
    "paper": {
        "data": {"source": "hf", "preset": "paper"},
        "models": {"preset": "paper"},
        "store": {
            "pairing": "paper",
            "n_tokens": 100_000_000,
            "dtype": "bfloat16",
            "heldout_fraction": 0.1,
        },
        # the authors' fork of dictionary_learning (BatchTopKCrossCoderTrainer and its script);
        # docs/crosscoder.md, "The paper's settings", lists each value and its source
        "crosscoder": {
            "expansion": 32,
            "k": 300,
            # designated shared latents, one decoder vector for all models (the fork averages
            # them after every step); the count is not published: 10% of d_sae = 32 * 768
            "n_shared": 2457,
            "shared_decoder": "tied",
            "shared_penalty": "sparsity",
            "sparsity_coefficient": 1 / 32,
            "shared_sparsity_coefficient": 0.7 / 32,  # the paper's shared-to-exclusive 0.7
            "code_normalization": "mixed",
            "code_normalization_alpha": 0.7,
            "threshold_schedule": "ema",
            "threshold_beta": 0.999,
            "threshold_start_step": 1000,
            "aux_loss": "fork",
            "aux_loss_coefficient": 1 / 32,
            "dead_after_tokens": 10_000_000,
            "recon_loss": "l2",
            "b_dec_init": "geometric_median",
            "steps": 40_000,
            "batch_size": 2048,
            "lr": 1e-3,
            "lr_warmup_steps": 1000,
            "lr_decay_fraction": 0.0,
        },
        "report": {"split": "paper", "max_tokens": 2_000_000},
        "model_seeds": {"n": 3},
    },
}


# run-wide sections next to the stages' options: extra crosscoder seeds, and model seeds (N dense
# and N MoE models; the science presets small and paper default to 3, tiny is the quick look)
RUN_SECTIONS: dict[str, dict[str, Any]] = {
    "replicates": {"crosscoder_seeds": 1},
    "model_seeds": {"n": 1},
}
