"""Spliced-in language-model loss: each model's loss with its paired activations replaced by the
crosscoder's reconstruction, against the clean loss and the loss with those activations ablated.

For model m and a set S of its paired sites (all of them at once, or one at a time):
    CE_clean    the model as it is
    CE_spliced  x_s <- x_hat_{m,s} at every s in S, where x_hat_m decodes the crosscoder's
                latents of *both* models' clean activations (it reads [n_models, d])
    CE_zero     x_s <- 0 at every s in S
    CE_mean     x_s <- the mean of x_s (over the evaluated tokens, or given)
    loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean), against each ablation.
Positions the harvest skips (BOS when the pairing drops it) keep their clean activation. Every
replacement is computed from the clean run, so splicing several sites at once replaces each with
the reconstruction of its clean value. CE is the mean next-token cross-entropy over all targets
(columns 1.. of every row), as the models stage's held-out evaluation reports it.

The crosscoder takes and returns raw activations (its scaling factors are folded into its
weights, as `train_crosscoder` and `CrossCoder.load` give it); a model's vector is the
concatenation of its sites' outputs in site order, zero-padded to the crosscoder's d_model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from crossdiff.activations.identity import check_tokenizers, weights_hash
from crossdiff.activations.pairing import Pairing, load_pairing
from crossdiff.activations.rows import as_token_rows
from crossdiff.activations.runner import check_hooks, eval_mode
from crossdiff.crosscoder.spliced_forwards import cache_key, evaluate, load_cached, save_cached
from crossdiff.crosscoder.splicer import (
    ENCODE_CHUNK,
    FORMULA,
    KINDS,
    MIN_ABLATION_GAP,
    Splicer,
    loss_recovered,
)
from crossdiff.data.tokens import TokenSet
from crossdiff.integrations.lens import LensModel
from crossdiff.plumbing.common import CrossdiffError

SPLICE_SEQUENCES = 64  # held-out rows `crossdiff run` and `crossdiff report` splice by default

__all__ = [  # the splicer's names are re-exported: spliced_loss.py was their home
    "ENCODE_CHUNK",
    "FORMULA",
    "KINDS",
    "MIN_ABLATION_GAP",
    "SPLICE_SEQUENCES",
    "loss_recovered",
    "spliced_loss",
    "spliced_loss_for_run",
    "spliced_loss_on",
    "summary_lines",
]


@torch.no_grad()
def spliced_loss(
    cc: Any,
    models: Sequence[LensModel],
    tokens: TokenSet | Int[Tensor, "n_seq seq_len"],
    pairing: Pairing | str | Path,
    *,
    model_names: Sequence[str] | None = None,
    max_sequences: int | None = None,
    batch_size: int = 8,
    ablation_means: Sequence[Tensor] | None = None,
    per_site: bool = True,
    progress: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """CE clean / spliced / zero-ablated / mean-ablated and loss recovered, per model.

    `models` are the models in the crosscoder's order (as harvested: dense, moe), `tokens` held-out
    rows (the first `max_sequences` are used). `ablation_means` (per model, the raw mean of its
    concatenated sites, e.g. a store's `running_stats.mean(m)`) replaces the default: the mean over
    the evaluated tokens the crosscoder reads. `per_site` adds each site spliced on its own.
    `cache_dir`: a folder where the clean and ablated sums (which do not depend on the
    crosscoder) are kept, keyed by the models' weights, the rows, the sites and the options, so
    a rerun with another crosscoder only runs the spliced forwards.
    Returns {"models": {name: {..., "per_site": [...]}}, "n_sequences", "n_targets", ...}.
    """
    pairing = load_pairing(pairing)
    models = tuple(models)
    names = tuple(model_names or ("dense", "moe")[: len(models)])
    n_models = int(cc.cfg.n_models)
    if len(models) != n_models or len(names) != n_models:
        raise CrossdiffError(
            f"the crosscoder reads {n_models} models but {len(models)} models and "
            f"{len(names)} names were given; pass the models in the order they were harvested"
        )
    if n_models != 2:
        raise CrossdiffError(f"spliced loss needs a crosscoder of 2 models, got {n_models}")
    if batch_size <= 0:
        raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
    rows = as_token_rows(tokens, pairing.drop_bos)
    if max_sequences is not None:
        if max_sequences <= 0:
            raise CrossdiffError(f"max_sequences must be positive, got {max_sequences}")
        rows.tokens, rows.keep = rows.tokens[:max_sequences], rows.keep[:max_sequences]
    if rows.tokens.shape[1] < 2:
        raise CrossdiffError("token rows need at least 2 tokens to have a next-token target")
    check_tokenizers(models, names, None, rows.tokens)  # type: ignore[arg-type]
    hooks = (pairing.hooks_a, pairing.hooks_b)
    for model, name, model_hooks in zip(models, names, hooks, strict=True):
        check_hooks(model, name, model_hooks)
    with eval_mode(models):
        splicer = Splicer(cc, models, names, hooks, rows.tokens, rows.keep, batch_size, progress)
        given = None if ablation_means is None else splicer.given_means(ablation_means)
        folder = None if cache_dir is None else Path(cache_dir)
        key = cache_key(splicer, per_site, ablation_means) if folder is not None else ""
        known = load_cached(folder, key)
        if known is not None and progress:
            print(f"spliced loss: clean and ablated losses from {folder}, spliced ones computed")
        sums = evaluate(splicer, given, per_site, known)
        if known is None:
            save_cached(folder, key, sums)
    return splicer.result(sums, per_site, given_means=ablation_means is not None)


def spliced_loss_on(
    cc: Any,
    acts_or_store: Any,
    models: Sequence[LensModel],
    tokens: TokenSet | Tensor | None,
    *,
    pairing: Pairing | str | Path | None = None,
    model_names: Sequence[str] | None = None,
    max_sequences: int | None = None,
) -> dict[str, Any]:
    """`spliced_loss` for `evaluate_crosscoder`: pairing and model names default to the store's."""
    if tokens is None:
        raise CrossdiffError(
            "models were given but no tokens: pass tokens=... (held-out token rows, a TokenSet or "
            "a LongTensor [n_seq, seq_len]) to compute the spliced-in loss"
        )
    manifest = getattr(acts_or_store, "manifest", None) or {}
    if pairing is None:
        if "pairing" not in manifest:
            raise CrossdiffError(
                "pass pairing=... (the preset name, TOML path or Pairing the activations were "
                "harvested with): a tensor of activations does not say which hooks it came from"
            )
        pairing = Pairing.from_dict(manifest["pairing"], "the store's manifest")
    if model_names is None and manifest.get("model_names"):
        model_names = list(manifest["model_names"])
    return spliced_loss(
        cc, models, tokens, pairing, model_names=model_names, max_sequences=max_sequences
    )


def spliced_loss_for_run(
    cc: Any,
    store: Any,
    models_dir: Any,
    heldout: TokenSet,
    *,
    max_sequences: int,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> dict[str, Any] | None:
    """The report's spliced-in loss: the store's models on held-out rows (`cache_dir`: see
    `spliced_loss`).

    `models_dir`: a folder with a model folder per store model name (`crossdiff run`'s layout), or
    a dict store model name -> loaded model or folder (crossdiff or Hugging Face, see
    crossdiff/models/by_name.py). None (with a printed note) when there are no held-out rows or a
    model is missing; an error when the models are not the ones the store was harvested from.
    """
    from crossdiff.models.by_name import resolve_models

    if max_sequences <= 0:
        return None
    if len(heldout) == 0:
        print("spliced loss: the held-out token set is empty, so it is not computed")
        return None
    names = list(store.model_names)
    where = "the models given" if isinstance(models_dir, dict) else str(models_dir)
    if not isinstance(models_dir, dict):
        missing = [str(Path(models_dir) / n) for n in names if not (Path(models_dir) / n).is_dir()]
        if missing:
            print(f"spliced loss: no model folder {missing}, so it is not computed")
            return None
    loaded = resolve_models(models_dir, names, device)
    if len(loaded) != len(names):
        print(f"spliced loss: no model for {sorted(set(names) - set(loaded))}, so not computed")
        return None
    models = [loaded[n] for n in names]
    for model, record in zip(models, store.manifest.get("models", []), strict=False):
        expected = record.get("weights_hash")
        if expected and weights_hash(model) != expected:
            raise CrossdiffError(
                f"model {record['name']!r} ({where}) is not the one the store was harvested "
                "from (weights differ); pass the models the store was harvested from"
            )
    n_rows = min(max_sequences, len(heldout))
    print(f"spliced loss: {n_rows} held-out rows, models from {where}")
    return spliced_loss(
        cc,
        models,
        heldout,
        Pairing.from_dict(store.manifest["pairing"], "the store's manifest"),
        model_names=names,
        max_sequences=max_sequences,
        progress=True,
        cache_dir=cache_dir,
    )


def summary_lines(spliced: dict[str, Any] | None) -> list[str]:
    """One line per model: CE clean / spliced / ablated and loss recovered, all sites at once."""
    if not spliced:
        return []
    lines = []
    for name, r in spliced["models"].items():
        lines.append(
            f"spliced loss {name}: CE clean {r['ce_clean']:.4f}, spliced {r['ce_spliced']:.4f}, "
            f"zero-ablated {r['ce_zero_ablated']:.4f}, mean-ablated {r['ce_mean_ablated']:.4f}; "
            f"loss recovered {_pct(r['loss_recovered_zero'])} (vs zero), "
            f"{_pct(r['loss_recovered_mean'])} (vs mean)"
        )
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
