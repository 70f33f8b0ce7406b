"""Shared test set-up. Shapes on public functions are checked by beartype through jaxtyping's pytest
plugin (see `addopts` in pyproject.toml). Tests are CPU-only, offline and seeded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny tensors gain nothing from threads, and OpenMP spin-waiting on a shared, loaded CPU makes
    them up to 25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
