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
    models_dir: str | Path,
    heldout: Any,
    *,
    n_candidates: int,
    max_sequences: int,
    device: Any = "cpu",
) -> bool:
    """Verify the top `n_candidates` latents of each exclusive class of `diff` with the models in
    `models_dir/<name>` on `max_sequences` held-out rows; False (with a printed note) when
    there is nothing to verify with."""
    from crossdiff.models import load_model

    names = list(store.model_names)
    if n_candidates <= 0 or max_sequences <= 0:
        return False
    if len(names) != 2 or heldout is None or len(heldout) == 0:
        print("screen-and-verify: needs 2 models and held-out rows, so it is not run")
        return False
    dirs = [Path(models_dir) / name for name in names]
    if not all(d.is_dir() for d in dirs):
        print(f"screen-and-verify: no model folders {[str(d) for d in dirs]}, so it is not run")
        return False
    candidates = screen_candidates(diff.table, names, n_candidates)
    models = [load_model(d, device=device) for d in dirs]
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
