"""A crosscoder's folder on disk: `cfg.json`, `sae_weights.safetensors` (SAELens's names) and the
weights' checksum, written atomically and read back through SAELens's loader with every check."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sae_lens.saes.sae import SAE

from crossdiff.crosscoder.disk_loader import crossdiff_disk_loader
from crossdiff.plumbing.common import (
    FILE_MODE,
    CrossdiffError,
    allocation_guard,
    disk_full_errno,
    disk_full_error,
    is_write_error,
    read_json,
)
from crossdiff.plumbing.integrity import (
    check_finite_module,
    sha256_of_file,
    verify_checksum,
    write_checksum,
)

WEIGHTS_FILE = "sae_weights.safetensors"


def save_folder(crosscoder: Any, path: str | Path) -> Path:
    """Write `path/cfg.json` and `path/sae_weights.safetensors` (SAELens names) and the
    weights' checksum `sae_weights.safetensors.sha256`, each file replaced atomically."""
    path = Path(path)
    crosscoder.check_padding("the crosscoder", "It was changed by hand after training; retrain it")
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".crosscoder.", dir=path))
    try:
        try:
            written = list(crosscoder.save_model(tmp))
            weights = tmp / WEIGHTS_FILE
            written.append(write_checksum(weights, sha256_of_file(weights)))
            for file in written:
                os.chmod(file, FILE_MODE)  # safetensors creates 0600
        except Exception as err:  # OSError, or safetensors' SafetensorError (not an OSError)
            if disk_full_errno(err) is not None:
                needed = sum(p.numel() * p.element_size() for p in crosscoder.state_dict().values())
                raise disk_full_error(path / WEIGHTS_FILE, err, needed) from err
            if is_write_error(err) and not isinstance(err, OSError):
                raise CrossdiffError(
                    f"could not write the crosscoder to {path}: {err}; check the disk and the "
                    "folder, then save it again"
                ) from err
            raise
        # the checksum goes last: an interrupted save never pairs new weights with an old sum
        for file in sorted(written, key=lambda p: p.name.endswith(".sha256")):
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_folder(
    path: str | Path, expected: type, device: str = "cpu", dtype: str | None = None
) -> Any:
    """The `expected` crosscoder class saved in `path`: checksum verified, weights finite,
    padding zero."""
    path = Path(path)
    if not (path / "cfg.json").exists() or not (path / WEIGHTS_FILE).exists():
        raise CrossdiffError(
            f"{path} is not a saved crosscoder (expected cfg.json and "
            f"{WEIGHTS_FILE}); train one with `crossdiff train-crosscoder`"
        )
    advice = (
        f"the folder {path} was damaged or edited after it was saved; save or train the "
        "crosscoder again (or restore the folder from a copy)"
    )
    weights = path / WEIGHTS_FILE
    verify_checksum(weights, "crosscoder weights", advice)
    cfg = read_json(path / "cfg.json", "crosscoder config")
    if not isinstance(cfg, dict):
        raise CrossdiffError(f"{path / 'cfg.json'} is not a JSON object; {advice}")
    try:
        n_weights = 2 * int(cfg.get("d_sae", 0)) * int(cfg.get("d_in", 0))
    except (TypeError, ValueError):
        n_weights = 0

    try:
        with allocation_guard(f"the crosscoder in {path}", 4 * n_weights):
            sae = SAE.load_from_disk(
                path, device=device, dtype=dtype, converter=crossdiff_disk_loader
            )
    except CrossdiffError:
        raise
    except Exception as err:  # SAELens/safetensors/torch errors for a config that misfits
        raise CrossdiffError(
            f"cannot load the crosscoder in {path}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. cfg.json and {WEIGHTS_FILE} "
            f"do not fit each other; {advice}"
        ) from err
    if not isinstance(sae, expected):
        raise CrossdiffError(f"{path} holds a {type(sae).__name__}, not a crosscoder")
    check_finite_module(sae, f"the crosscoder in {path}", advice)
    sae.check_padding(f"the crosscoder in {path}", advice)
    return sae
