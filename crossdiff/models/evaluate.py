"""Held-out evaluation of the language models: cross-entropy per domain against a unigram
baseline, and the MoE's expert load table."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from crossdiff.data.tokens import TokenSet
from crossdiff.models.build import is_moe

TARGET_GAP = 1.0  # nats below the unigram cross-entropy each model must reach on every domain
LOAD_BOUNDS = (0.25, 4.0)  # every expert's share of routed slots within [0.25/E, 4/E]


def _domain_rows(token_set: TokenSet, max_rows: int) -> dict[str, TokenSet]:
    """The first `max_rows` rows of each domain present in the set (fixed, so runs compare)."""
    out = {}
    for index, name in enumerate(token_set.domain_names):
        rows = torch.nonzero(token_set.domains == index).flatten()[:max_rows]
        if len(rows):
            out[name] = token_set.subset(rows)
    return out


def heldout_cross_entropy(
    model: HookedTransformer, heldout: TokenSet, max_rows: int = 64, batch_size: int = 16
) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) per domain; targets are columns 1.. of each row."""
    return _evaluate(model, heldout, max_rows, batch_size, with_load=False)[0]


def expert_load(
    model: HookedTransformer, heldout: TokenSet, max_rows: int = 64, batch_size: int = 16
) -> Float[Tensor, "n_layers n_experts"]:
    """Fraction of routed token-slots each expert receives, per MoE layer, on held-out rows."""
    return _evaluate(model, heldout, max_rows, batch_size, with_load=True)[1]


@torch.no_grad()
def _evaluate(
    model: HookedTransformer, heldout: TokenSet, max_rows: int, batch_size: int, with_load: bool
) -> tuple[dict[str, float], Tensor]:
    """Cross-entropy per domain and (with_load) the expert load table, in one pass."""
    model.eval()
    device = next(model.parameters()).device
    n_experts = model.cfg.num_experts or 1
    names = [f"blocks.{layer}.mlp.hook_expert_indices" for layer in range(model.cfg.n_layers)]
    counts = torch.zeros(model.cfg.n_layers, n_experts, dtype=torch.float64)
    cross_entropy = {}
    for domain, rows in _domain_rows(heldout, max_rows).items():
        total, n_targets = 0.0, 0
        for start in range(0, len(rows), batch_size):
            tokens = rows.tokens[start : start + batch_size].to(device)
            kwargs = dict(return_type="loss", loss_per_token=True)
            if with_load:
                per_token, cache = model.run_with_cache(
                    tokens, names_filter=lambda n: n in names, **kwargs
                )
                for layer, name in enumerate(names):
                    indices = cache[name].flatten().cpu()
                    counts[layer] += torch.bincount(indices, minlength=n_experts)
            else:
                per_token = model(tokens, **kwargs)
            total += float(per_token.double().sum())
            n_targets += per_token.numel()
        cross_entropy[domain] = total / n_targets
    load = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).float()
    return cross_entropy, load


def unigram_cross_entropy(
    train: TokenSet, heldout: TokenSet, d_vocab: int, max_rows: int = 64
) -> dict[str, float]:
    """Cross-entropy of each domain's add-one-smoothed unigram distribution, estimated on that
    domain's train tokens and evaluated on the same held-out targets as the models."""
    result = {}
    for name, rows in _domain_rows(heldout, max_rows).items():
        train_rows = train.domain_rows(name) if name in set(train.domain_names) else None
        counts = torch.ones(d_vocab, dtype=torch.float64)
        if train_rows is not None and len(train_rows):
            targets = train_rows.tokens[:, 1:].reshape(-1)
            counts += torch.bincount(targets, minlength=d_vocab)[:d_vocab].double()
        log_probs = (counts / counts.sum()).log()
        result[name] = float(-log_probs[rows.tokens[:, 1:].reshape(-1)].mean())
    return result


def evaluate_models(
    models: dict[str, HookedTransformer], train: TokenSet, heldout: TokenSet, max_rows: int = 64
) -> dict[str, Any]:
    """The numbers eval.json holds: per model and domain, held-out and unigram cross-entropy
    and their gap; for MoE models, the expert load table and whether it is within bounds."""
    out: dict[str, Any] = {"target_gap_nats": TARGET_GAP, "heldout_rows_per_domain": max_rows}
    out["models"] = {}
    for name, model in models.items():
        moe = is_moe(model)
        model_ce, load = _evaluate(model, heldout, max_rows, batch_size=16, with_load=moe)
        unigram = unigram_cross_entropy(train, heldout, model.cfg.d_vocab, max_rows)
        domains = {
            d: {
                "cross_entropy": model_ce[d],
                "unigram_cross_entropy": unigram[d],
                "gap": unigram[d] - model_ce[d],
            }
            for d in model_ce
        }
        entry: dict[str, Any] = {
            "domains": domains,
            "meets_target": all(v["gap"] >= TARGET_GAP for v in domains.values()),
        }
        if moe:
            n = model.cfg.num_experts
            low, high = LOAD_BOUNDS[0] / n, LOAD_BOUNDS[1] / n
            entry["expert_load"] = {
                "fractions": load.tolist(),  # [layer][expert]
                "min": float(load.min()),
                "max": float(load.max()),
                "bounds": [low, high],
                "balanced": bool(load.min() >= low and load.max() <= high),
            }
        out["models"][name] = entry
    return out


def print_evaluation(results: dict[str, Any]) -> None:
    print(f"held-out cross-entropy (nats; target: at least {TARGET_GAP} below unigram)")
    print(f"  {'model':<6} {'domain':<9} {'model':>7} {'unigram':>8} {'gap':>6}")
    for name, entry in results["models"].items():
        for domain, v in entry["domains"].items():
            print(
                f"  {name:<6} {domain:<9} {v['cross_entropy']:7.3f} "
                f"{v['unigram_cross_entropy']:8.3f} {v['gap']:6.3f}"
            )
        print(f"  {name}: {'meets' if entry['meets_target'] else 'MISSES'} the target")
    for name, entry in results["models"].items():
        load = entry.get("expert_load")
        if load is None:
            continue
        low, high = load["bounds"]
        print(f"{name} expert load (share of routed slots; bounds {low:.4f} to {high:.4f})")
        for layer, row in enumerate(load["fractions"]):
            print(f"  layer {layer}: " + " ".join(f"{x:.3f}" for x in row))
        state = "balanced" if load["balanced"] else "OUT OF BOUNDS"
        print(f"  min {load['min']:.4f}, max {load['max']:.4f}: {state}")
