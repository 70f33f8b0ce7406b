"""TransformerLens 4 (which removed HookedTransformer), simulated: `transformer_lens` without that
name and its module. `import crossdiff` and the harvest's modules import; crossdiff's own models
and the crosscoder (SAELens 6 imports HookedTransformer) raise an error naming the installed
TransformerLens, what needs version 3 and SAELens's own pin, instead of a bare ImportError."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from crossdiff.integrations import lens
from crossdiff.plumbing.common import CrossdiffError

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import transformer_lens
del transformer_lens.HookedTransformer                # TransformerLens 4 has no such name
sys.modules["transformer_lens.HookedTransformer"] = None  # nor module
import crossdiff
import crossdiff.integrations.lens
crossdiff.integrations.lens.tl_version = lambda: "4.3.0"
import crossdiff.activations                           # the harvest imports no HookedTransformer
from crossdiff.activations import harvest, Pairing     # noqa: F401
for name in ("build_model", "train_crosscoder"):
    try:
        getattr(crossdiff, name)
    except crossdiff.CrossdiffError as err:
        print(f"{name}: CrossdiffError: {err}")
    except BaseException as err:
        print(f"{name}: {type(err).__name__}: {err}")
    else:
        print(f"{name}: imported")
"""


def test_the_version_error_names_the_version_what_needs_3_and_saelens_pin(monkeypatch):
    """In-process, the message alone: on TransformerLens 3 an ImportError passes through."""
    err = ImportError("cannot import name 'HookedTransformer' from 'transformer_lens'")
    assert lens.explain_import_error(err, "crossdiff.models") is None  # TL 3: the caller re-raises
    monkeypatch.setattr(lens, "has_hooked_transformer", lambda: False)
    monkeypatch.setattr(lens, "tl_version", lambda: "4.3.0")
    with pytest.raises(CrossdiffError) as info:
        lens.explain_import_error(err, "crossdiff.crosscoder (an SAELens SAE)")
    message = str(info.value)
    assert (
        "crossdiff.crosscoder (an SAELens SAE) needs transformer_lens.HookedTransformer" in message
    )
    assert "TransformerLens 4.3.0 does not have" in message
    assert "requires 'transformer-lens>=2.16.1,<4.0.0'" in message
    assert info.value.__cause__ is err


@pytest.mark.slow  # about 15 s: a fresh interpreter importing torch, TransformerLens and SAELens
def test_tl4_gives_a_version_error_not_a_traceback():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    models, crosscoder = lines["build_model"], lines["train_crosscoder"]
    for message in (models, crosscoder):
        assert message.startswith("CrossdiffError: ")
        assert "TransformerLens 4.3.0 does not have" in message
        assert "pip install 'transformer-lens>=3,<4'" in message
    assert "crossdiff.models (crossdiff's dense and MoE models" in models
    pin = next(r for r in metadata.requires("sae-lens") if r.startswith("transformer-lens"))
    assert pin == "transformer-lens>=2.16.1,<4.0.0"  # SAELens 6.54's own line (docs/models.md)
    assert f"requires {pin!r}" in crosscoder
