"""Checks of `crossdiff run`'s options against what they refer to, made before any stage folder is
moved or removed: the pairing's hooks against the models the preset builds (checked on models
built on the `meta` device: no weights, under a second) and, once the data stage has given the
token set, the store's `n_tokens` against the tokens it holds. A stage's own checks then never
fail after a redo has taken away the results it would replace."""

from __future__ import annotations

from typing import Any

from crossdiff.plumbing.common import CrossdiffError


def pairing_problems(options: dict[str, dict[str, Any]]) -> list[str]:
    """The pairing's hook points that the preset's dense or MoE model lacks (one line each)."""
    import torch

    from crossdiff.activations import load_pairing
    from crossdiff.activations.runner import check_hooks
    from crossdiff.models import build_model
    from crossdiff.models.configs import matched_configs

    try:
        pairing = load_pairing(options["store"].get("pairing", "paper"))
        dense_cfg, moe_cfg = matched_configs(
            options["models"].get("preset", "tiny"), d_vocab=8, device="meta"
        )
    except CrossdiffError:
        return []  # validate_run_options reports these
    problems = []
    with torch.device("meta"):
        models = (build_model(dense_cfg), build_model(moe_cfg))
    sides = (pairing.hooks_a, pairing.hooks_b)
    for model, name, hooks in zip(models, ("dense", "moe"), sides, strict=True):
        try:
            check_hooks(model, name, hooks)
        except CrossdiffError as err:
            problems.append(f"store: pairing {pairing.name!r}: {err}")
    return problems


def check_store_tokens(options: dict[str, dict[str, Any]], data: Any) -> None:
    """The store's n_tokens fits in the token set the data stage made (as the harvest counts
    them: every row's tokens, less BOS when the pairing drops it)."""
    from crossdiff.activations import load_pairing
    from crossdiff.activations.rows import as_token_rows

    n_tokens = options["store"].get("n_tokens")
    if n_tokens is None:
        return
    pairing = load_pairing(options["store"].get("pairing", "paper"))
    available = int(as_token_rows(data.train, pairing.drop_bos).keep.sum())
    if int(n_tokens) > available:
        raise CrossdiffError(
            f"store: n_tokens={n_tokens} (--harvest-tokens) but the run's training token set has "
            f"{available} tokens to harvest; ask for at most {available}, or raise the data "
            "options (n_chars_per_domain) for a bigger token set. Nothing was removed"
        )
