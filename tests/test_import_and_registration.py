"""`import crossdiff` stays light; the crosscoder reaches SAELens's registry in any import order
under its namespaced name; old folders load; the CLI's help starts without the stage modules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

import crossdiff
import crossdiff.crosscoder.train as trainer_module
from crossdiff.cli import _COMMANDS, build_parser
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig, load_crosscoder, train_crosscoder
from crossdiff.crosscoder.registration import LEGACY_ARCHITECTURE, register_with_sae_lens
from crossdiff.crosscoder.synthetic import planted_crosscoder_data
from crossdiff.plumbing.common import CrossdiffError

HEAVY = ("sae_lens", "transformers", "datasets", "pandas", "scipy", "wandb", "torch")
ROOT = Path(__file__).resolve().parents[1]


def fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def saved_crosscoder(tmp_path_factory):
    """A crosscoder trained on planted features, saved, and its reconstruction of a fixed batch."""
    torch.manual_seed(0)
    acts, _ = planted_crosscoder_data(2048, 8, n_shared=4, n_a_only=2, n_b_only=2, seed=0)
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=3)
    cc = train_crosscoder(acts, cfg, steps=40, batch_size=128)
    folder = tmp_path_factory.mktemp("cc")
    cc.save(folder)
    return folder, cc


def old_name_copy(folder: Path, tmp_path: Path) -> Path:
    old = tmp_path / "old"
    old.mkdir()
    for file in folder.iterdir():
        (old / file.name).write_bytes(file.read_bytes())
    cfg = json.loads((old / "cfg.json").read_text())
    cfg["architecture"] = LEGACY_ARCHITECTURE  # what crossdiff wrote before the rename
    (old / "cfg.json").write_text(json.dumps(cfg))
    return old


def test_import_crossdiff_imports_no_heavy_library():
    out = fresh_python(
        "import sys, crossdiff\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(crossdiff.__version__)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", crossdiff.__version__]


def test_cli_help_lists_every_command_without_importing_torch():
    out = fresh_python(
        "import sys\nfrom crossdiff.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2:] == ["exit 0", "[]"]
    for name, _, help_line in _COMMANDS:
        assert name in out.stdout and help_line.split()[0] in out.stdout


def test_the_help_lines_of_the_cli_match_each_stage_module():
    full = build_parser()
    subparsers = full._subparsers._group_actions[0]  # type: ignore[union-attr]
    registered = {action.dest: action.help for action in subparsers._choices_actions}
    assert registered == {name: help_line for name, _, help_line in _COMMANDS}


def test_the_console_script_entry_point_prints_help():
    out = subprocess.run(
        [sys.executable, "-m", "crossdiff", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: crossdiff") and "train-crosscoder" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "order",
    ["import crossdiff\nfrom sae_lens import SAE", "from sae_lens import SAE\nimport crossdiff"],
)
def test_saelens_loads_a_saved_crosscoder_in_either_import_order(saved_crosscoder, order):
    folder, cc = saved_crosscoder
    out = fresh_python(
        f"{order}\nm = SAE.load_from_disk({str(folder)!r})\n"
        "print(type(m).__module__, type(m).__name__, float(m.W_enc.double().sum()))"
    )
    assert out.returncode == 0, out.stderr
    module, name, enc_sum = out.stdout.split()
    assert (module, name) == ("crossdiff.crosscoder.model", "CrossCoder")
    assert float(enc_sum) == pytest.approx(float(cc.W_enc.detach().double().sum()), rel=1e-12)


def test_the_architecture_is_registered_under_its_namespaced_name(saved_crosscoder):
    folder, _ = saved_crosscoder
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "crossdiff.crosscoder"
    assert SAE_CLASS_REGISTRY["crossdiff.crosscoder"][0] is CrossCoder
    assert SAE_TRAINING_CLASS_REGISTRY["crossdiff.crosscoder"][0].__name__ == "TrainingCrossCoder"
    register_with_sae_lens()  # a second registration of the same classes is no error


def test_a_folder_saved_under_the_old_name_loads(saved_crosscoder, tmp_path):
    folder, cc = saved_crosscoder
    old = old_name_copy(folder, tmp_path)
    x = torch.randn(16, 2, 8, generator=torch.Generator().manual_seed(1))
    for loaded in (SAE.load_from_disk(old), crossdiff.load_crosscoder(old)):
        assert isinstance(loaded, CrossCoder)
        torch.testing.assert_close(loaded(x), cc(x), rtol=0, atol=0)


class OtherPluginSAE:
    pass


def test_the_namespaced_name_taken_by_another_class_raises_naming_it(monkeypatch):
    monkeypatch.setitem(SAE_CLASS_REGISTRY, "crossdiff.crosscoder", (OtherPluginSAE, object))
    with pytest.raises(CrossdiffError, match=r"test_import_and_registration\.OtherPluginSAE"):
        register_with_sae_lens()


def test_the_old_name_taken_by_another_plugin_warns_and_old_folders_still_load(
    saved_crosscoder, tmp_path, monkeypatch
):
    folder, cc = saved_crosscoder
    monkeypatch.setitem(SAE_CLASS_REGISTRY, LEGACY_ARCHITECTURE, (OtherPluginSAE, object))
    with pytest.warns(UserWarning, match="OtherPluginSAE"):
        register_with_sae_lens()
    assert SAE_CLASS_REGISTRY[LEGACY_ARCHITECTURE][0] is OtherPluginSAE  # left to its owner
    old = old_name_copy(folder, tmp_path)
    with pytest.warns(UserWarning, match="OtherPluginSAE"):
        loaded = load_crosscoder(old)
    torch.testing.assert_close(loaded.W_dec_untied, cc.W_dec_untied, rtol=0, atol=0)


def test_load_crosscoder_refuses_another_saelens_architecture(saved_crosscoder, tmp_path):
    folder, _ = saved_crosscoder
    other = old_name_copy(folder, tmp_path)
    cfg = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps(cfg | {"architecture": "standard"}))
    with pytest.raises(CrossdiffError, match="'standard' SAE, not a crossdiff crosscoder"):
        load_crosscoder(other)


def test_crosscoder_training_opens_one_bar_and_restores_saelens(monkeypatch):
    import sae_lens.training.sae_trainer as sae_trainer

    bars: list[dict] = []
    real_tqdm = trainer_module.tqdm

    def recording_tqdm(*args, **kwargs):
        bars.append(kwargs)
        return real_tqdm(*args, **kwargs | {"disable": True})

    monkeypatch.setattr(trainer_module, "tqdm", recording_tqdm)
    saelens_tqdm = sae_trainer.tqdm
    acts, _ = planted_crosscoder_data(1024, 8, n_shared=4, n_a_only=2, n_b_only=2, seed=1)
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=3)
    train_crosscoder(acts, cfg, steps=5, batch_size=64)
    assert [(b["desc"], b["unit"], b["total"]) for b in bars] == [("crosscoder", "tok", 5 * 64)]
    assert sae_trainer.tqdm is saelens_tqdm
