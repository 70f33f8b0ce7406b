"""Shared test set-up. Shapes on public functions are checked by beartype through jaxtyping's pytest
plugin (see `addopts` in pyproject.toml). Tests are CPU-only, offline and seeded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
