"""The models stage: its config and its `run`, called by `crossdiff train-models` and by
`crossdiff run` (its main pair, and the control pair with another `init_seed`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from crossdiff.models.moe import DEFAULT_LOAD_BALANCE_COEF, DEFAULT_Z_LOSS_COEF
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.stage_config import StageConfig

# `positions` option -> TransformerLens's positional_embedding_type ("rotary" is the seed paper
# authors' choice in their tiny-moe code; crossdiff's presets learn absolute positions)
POSITIONS = {"learned": "standard", "rotary": "rotary"}


@dataclass(frozen=True)
class ModelsStageConfig(StageConfig):
    """A run preset's "models" options, or train-models' flags (train_language_models's
    keywords; None: the model preset's training default)."""

    STAGE = "models"

    preset: str = "tiny"
    steps: int | None = None
    batch_size: int | None = None
    lr: int | float | None = None
    warmup: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    eval_rows: int = 64
    weight_decay: int | float = 0.1
    grad_clip: int | float = 1.0
    load_balance_coef: int | float = DEFAULT_LOAD_BALANCE_COEF
    z_loss_coef: int | float = DEFAULT_Z_LOSS_COEF
    threads: int | None = None
    parallel: bool | None = None
    autocast: bool | None = None
    init_seed: int | None = None  # default: the seed (model seeds use seed + an offset)
    positions: str | None = None  # learned (the presets') or rotary (the authors' tiny-moe)
    dense_cfg: Any = None  # HookedTransformerConfigs; default: the preset's, matched
    moe_cfg: Any = None

    def __post_init__(self) -> None:
        if self.positions is not None and self.positions not in POSITIONS:
            raise CrossdiffError(
                f"models: positions={self.positions!r}; expected one of {sorted(POSITIONS)} "
                "(learned absolute positions, or rotary as in the seed paper's model code)"
            )


def run_models_stage(
    config: ModelsStageConfig,
    data: Any,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: Any = "auto",
    dtype: str | None = None,
) -> Any:
    """Train the dense and the MoE model on `data` (a PreparedData) into `out_dir` (dense/,
    moe/, tokenizer/, eval.json), resuming; the TrainedModels. `dtype`: the models' parameter
    dtype (default: the preset's configs as they are)."""
    from crossdiff.models.configs import matched_configs
    from crossdiff.models.train import train_language_models
    from crossdiff.plumbing.common import resolve_dtype

    options = {f.name: getattr(config, f.name) for f in fields(config)}
    positions = options.pop("positions")
    overrides: dict[str, Any] = {}
    if dtype is not None:
        overrides["dtype"] = resolve_dtype(dtype)
    if positions is not None:
        overrides["positional_embedding_type"] = POSITIONS[positions]
    if overrides and (config.dense_cfg is None or config.moe_cfg is None):
        dense, moe = matched_configs(
            config.preset, d_vocab=int(data.tokenizer.vocab_size), **overrides
        )
        options["dense_cfg"] = config.dense_cfg or dense
        options["moe_cfg"] = config.moe_cfg or moe
    return train_language_models(
        data.train,
        data.heldout,
        out_dir,
        tokenizer=data.tokenizer,
        seed=seed,
        device=str(device),
        **options,
    )
