"""The models stage's `positions` option: rotary positions, as in the seed paper's tiny-moe code."""

from __future__ import annotations

import pytest

from crossdiff.data import prepare_data
from crossdiff.models.io import load_model
from crossdiff.models.stage import ModelsStageConfig, run_models_stage
from crossdiff.plumbing.common import CrossdiffError


@pytest.mark.slow  # prepares data and trains both models two steps
def test_rotary_positions_train_both_models_without_a_position_table(tmp_path):
    data = prepare_data(tmp_path / "data", preset="tiny", n_chars_per_domain=40_000)
    config = ModelsStageConfig.from_options(
        {"preset": "tiny", "steps": 2, "checkpoint_every": 2, "eval_rows": 2, "positions": "rotary"}
    )
    models = run_models_stage(config, data, tmp_path / "models", device="cpu", dtype="float32")
    for name in ("dense", "moe"):
        reloaded = load_model(tmp_path / "models" / name)
        for model in (getattr(models, name), reloaded):
            assert model.cfg.positional_embedding_type == "rotary"
            assert not any("W_pos" in p for p, _ in model.named_parameters())
    assert models.moe.cfg.num_experts == 8


def test_an_unknown_positions_value_names_the_choices():
    with pytest.raises(CrossdiffError, match="learned.*rotary"):
        ModelsStageConfig.from_options({"positions": "alibi"})
