"""The data stage: its config and its `run`, called by `crossdiff prepare-data` (and
`train-models` when it prepares OUT/data) and by `crossdiff run`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from crossdiff.plumbing.stage_config import StageConfig


@dataclass(frozen=True)
class DataStageConfig(StageConfig):
    """A run preset's "data" options, or prepare-data's flags (prepare_data's keywords)."""

    STAGE = "data"

    source: str | None = None  # default: the preset's ("embedded" for tiny, "hf" for paper)
    preset: str = "tiny"
    n_chars_per_domain: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    heldout_fraction: int | float = 0.05
    hf_sources: Any = None  # a list of DomainSource (prepare-data --hf-source)
    proportions: Any = None
    tokenizer: Any = None  # a tokenizer, a saved folder or a Hugging Face name


def run_data_stage(
    config: DataStageConfig, inputs: None, out_dir: str | Path, *, seed: int = 0
) -> Any:
    """Build (or load, when `out_dir` already has it) the corpus, tokenizer and token sets; the
    PreparedData. The data stage reads no other stage (`inputs` is None)."""
    from crossdiff.data import prepare_data  # the package's name, so a patched one is used

    options = {f.name: getattr(config, f.name) for f in fields(config)}
    return prepare_data(out_dir, seed=seed, **options)
