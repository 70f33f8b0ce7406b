"""The SAELens members crossdiff's CrossCoderTrainer overrides or calls, pinned.

crossdiff trains through sae_lens.training.sae_trainer.SAETrainer (subclassed in
crossdiff/crosscoder/train.py) and overrides some of its private members. pyproject pins
sae-lens to the tested minor release; this test says, by name, what an SAELens upgrade changed
of what crossdiff relies on (docs/architecture.md, "The SAELens boundary"), so the upgrade fails
here rather than in a training run.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.training import sae_trainer as sae_trainer_module
from sae_lens.training.sae_trainer import SAETrainer

ROOT = Path(__file__).resolve().parents[1]

# method -> the parameters (after self), in order, that crossdiff overrides or calls it with
METHODS = {
    "__init__": ["cfg", "sae", "data_provider", "evaluator", "save_checkpoint_fn"],
    "fit": [],
    "step": ["batch"],  # overridden: adds the other ranks' rows to n_training_samples
    "_train_step": ["sae", "sae_in"],  # overridden: data-parallel, no host synchronisation
    "_checkpoint_if_needed": [],  # overridden: crossdiff's own checkpoints
    "_update_pbar": ["step_output", "pbar", "update_interval"],  # overridden: crossdiff's log
    "_is_logging_step": [],  # called by the overridden _train_step
    "get_coefficients": [],  # called by the overridden _train_step
    "save_checkpoint": ["checkpoint_name", "base_path", "wandb_aliases"],  # overridden
}
# fit's loop, in the order crossdiff's overrides assume: step, then checkpoint, then the step
# count, then the progress bar (crossdiff's _checkpoint_if_needed saves "after this step")
FIT_ORDER = [
    "self.step(",
    "self._checkpoint_if_needed()",
    "self.n_training_steps += 1",
    "self._update_pbar(",
]
# instance state the overrides and crossdiff's checkpoints read or write
STATE = [
    "n_training_steps",
    "n_training_samples",
    "act_freq_scores",
    "n_forward_passes_since_fired",
    "n_frac_active_samples",
    "optimizer",
    "lr_scheduler",
    "coefficient_schedulers",
    "autocast_if_enabled",
    "data_provider",
    "sae",
    "cfg",
]


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_methods_crossdiff_overrides_or_calls_keep_their_parameters(name):
    member = getattr(SAETrainer, name, None)
    assert member is not None, (
        f"SAELens's SAETrainer no longer has {name!r}, which crossdiff's CrossCoderTrainer "
        "overrides or calls (crossdiff/crosscoder/train.py); port the trainer to this SAELens"
    )
    got = _params(member)
    assert got == METHODS[name], (
        f"SAETrainer.{name} now takes {got}, crossdiff relies on {METHODS[name]} "
        "(crossdiff/crosscoder/train.py); port the override to the new signature"
    )


def test_fit_calls_the_overridden_steps_in_the_order_crossdiff_assumes():
    source = inspect.getsource(SAETrainer.fit)
    where = {call: source.find(call) for call in FIT_ORDER}
    missing = [call for call, at in where.items() if at < 0]
    assert not missing, (
        f"SAETrainer.fit no longer contains {missing}; crossdiff's overrides of step, "
        "_checkpoint_if_needed and _update_pbar assume fit calls them once per step"
    )
    order = sorted(FIT_ORDER, key=where.get)
    assert order == FIT_ORDER, f"SAETrainer.fit now runs {order}, crossdiff assumes {FIT_ORDER}"
    step = inspect.getsource(SAETrainer.step)
    assert "self._train_step(" in step, "SAETrainer.step no longer calls self._train_step"
    assert "tqdm(" in source, "SAETrainer.fit no longer opens its bar through the module's tqdm"


def test_the_state_and_module_names_crossdiff_uses_exist(tmp_path):
    init = inspect.getsource(SAETrainer.__init__)
    missing = [name for name in STATE if not re.search(rf"self\.{name}\b\s*(:[^=]*)?=", init)]
    assert not missing, f"SAETrainer.__init__ no longer sets {missing}, which crossdiff reads"
    assert isinstance(SAETrainer.dead_neurons, property), "SAETrainer.dead_neurons changed kind"
    assert hasattr(sae_trainer_module, "tqdm"), (
        "sae_lens.training.sae_trainer has no module-level tqdm: CrossCoderTrainer.fit swaps it "
        "for crossdiff's bar"
    )
    fields = set(inspect.signature(TrainStepInput).parameters)
    assert {
        "sae_in",
        "dead_neuron_mask",
        "coefficients",
        "n_training_steps",
        "is_logging_step",
    } <= fields, f"TrainStepInput's fields are now {sorted(fields)}"
    out = set(inspect.signature(TrainStepOutput).parameters)
    assert {"sae_in", "sae_out", "feature_acts", "loss", "losses"} <= out, (
        f"TrainStepOutput's fields are now {sorted(out)}"
    )


def test_pyproject_pins_the_tested_sae_lens_minor_release():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "sae-lens>=6.54,<6.55" in deps, (
        "pyproject's sae-lens bound must be the release this contract was checked against; "
        "raise it only together with this test"
    )
