"""Screen-and-verify inside a run's report: the store's models loaded from the run's models folder,
the candidates screened from the diff's table, verified on held-out rows, written into the diff."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crossdiff.activations.pairing import Pairing
from crossdiff.analysis.verify import add_verification, screen_candidates, verify_latents


def verify_for_run(
    diff: Any,
    store: Any,
    models_dir: Any,
    heldout: Any,
    *,
    n_candidates: int,
    max_sequences: int,
    device: Any = "cpu",
) -> bool:
    """Verify the top `n_candidates` latents of each exclusive class of `diff` with the store's
    models on `max_sequences` held-out rows; False (with a printed note) when there is nothing
    to verify with. `models_dir`: a folder with a model folder per store model name, or a dict
    store model name -> loaded model or folder (crossdiff or Hugging Face: models/by_name.py)."""
    from crossdiff.models.by_name import resolve_models

    names = list(store.model_names)
    if n_candidates <= 0 or max_sequences <= 0:
        return False
    if len(names) != 2 or heldout is None or len(heldout) == 0:
        print("screen-and-verify: needs 2 models and held-out rows, so it is not run")
        return False
    loaded = resolve_models(models_dir, names, device)
    if len(loaded) != len(names):
        where = models_dir if isinstance(models_dir, str | Path) else "the models given"
        missing = sorted(set(names) - set(loaded))
        print(f"screen-and-verify: no model for {missing} in {where}, so it is not run")
        return False
    candidates = screen_candidates(diff.table, names, n_candidates)
    models = [loaded[n] for n in names]
    pairing = Pairing.from_dict(store.manifest["pairing"], "the store's manifest")
    print(f"screen-and-verify: {len(candidates)} candidates on {max_sequences} held-out rows")
    results = verify_latents(
        diff.crosscoder, models, heldout, pairing, candidates, model_names=names,
        max_sequences=max_sequences, tokenizer=diff.tokenizer, progress=True,
    )  # fmt: skip
    add_verification(
        diff, results, {"n_candidates_per_class": n_candidates, "max_sequences": max_sequences}
    )
    return True
