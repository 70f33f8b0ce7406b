"""The store stage (paired activations): its config and its `run`, called by `crossdiff harvest`
and by `crossdiff run` (its main pair and the controls' pairs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import read_json
from crossdiff.plumbing.stage_config import StageConfig

TOKENIZER_META = "crossdiff_tokenizer.json"


@dataclass(frozen=True)
class StoreStageConfig(StageConfig):
    """A run preset's "store" options, or harvest's flags."""

    STAGE = "store"

    pairing: str = "paper"  # a pairing preset's name or a TOML path
    n_tokens: int | None = None  # default: every token of the token set
    dtype: str = "float16"  # of the activations on disk
    heldout_fraction: int | float = 0.1
    model_dtype: str | None = None  # the models' compute dtype (default: bfloat16 on CUDA)
    batch_size: int = 32  # rows per forward pass


@dataclass(frozen=True)
class ModelPair:
    """The store stage's inputs: two saved models, their names, the token set to run them on,
    and optionally a Pairing that replaces the config's (a control pair's sites)."""

    dirs: tuple[Path, Path]
    names: tuple[str, str]
    token_set: Any
    pairing: Any = None


def tokenizer_meta(model_dir: Path) -> dict[str, Any] | None:
    """The tokenizer metadata (name, fingerprint) saved next to a model, if any."""
    for folder in (model_dir, model_dir / "tokenizer", model_dir.resolve().parent / "tokenizer"):
        if (folder / TOKENIZER_META).exists():
            return read_json(folder / TOKENIZER_META, "tokenizer metadata")
    return None


class _Named:
    """Tokenizer metadata (name, fingerprint) read from a saved tokenizer folder."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.name = meta.get("name")
        self.fingerprint = meta.get("fingerprint")


def run_store_stage(
    config: StoreStageConfig,
    inputs: ModelPair,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: Any = None,
    dtype: str | None = None,
    resume: bool = True,
) -> Any:
    """Harvest the pair's activations into a store at `out_dir` (resuming); the
    ActivationStore. `seed` chooses the held-out documents; `dtype` casts the loaded models."""
    from crossdiff.activations.harvest import harvest
    from crossdiff.models import load_model
    from crossdiff.plumbing.common import resolve_dtype

    models = [load_model(d, device=str(device)) for d in inputs.dirs]
    if dtype is not None:
        models = [m.to(resolve_dtype(dtype)) for m in models]
    metas = [tokenizer_meta(Path(d)) for d in inputs.dirs]
    return harvest(
        models[0],
        models[1],
        inputs.token_set,
        config.pairing if inputs.pairing is None else inputs.pairing,
        out_dir,
        n_tokens=config.n_tokens,
        batch_size=config.batch_size,
        dtype=config.dtype,
        model_names=tuple(inputs.names),
        device=str(device),
        resume=resume,
        tokenizer=_Named(metas[0]) if metas[0] else None,
        tokenizer_fingerprints=tuple(m.get("fingerprint") if m else None for m in metas),
        heldout_fraction=config.heldout_fraction,
        split_seed=seed,
        model_dtype=config.model_dtype,
    )
