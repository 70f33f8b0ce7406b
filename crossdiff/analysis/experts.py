"""Expert attribution per (layer, expert).

Per latent and per recorded MoE layer: the distribution of the experts its firing tokens were
routed to, against the routing base rate of all analysed tokens in that layer (lift, KL divergence
in bits), and a Miller-Madow bias-corrected entropy. Below a minimum number of firings nothing is
attributed (NaN / -1). Each of a token's top-k slots counts once, so a layer's distribution is
over routed slots; lift is the same ratio whichever unit is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from crossdiff.activations.pairing import hook_layer
from crossdiff.plumbing.common import CrossdiffError

DEFAULT_MIN_FIRINGS = 20
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer's part of the per-token experts row: columns [start, stop)."""

    hook: str | None
    layer: int
    n_experts: int | None  # None: grown to the largest expert id seen
    columns: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "layer": self.layer,
            "n_experts": self.n_experts,
            "columns": list(self.columns),
        }


def _parse_layout(entries: list[Any], width: int, where: str) -> tuple[ExpertLayer, ...]:
    layers: list[ExpertLayer] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "columns" not in entry:
            raise CrossdiffError(
                f"{where}: entry {i} is {entry!r}; expected a dict with `columns` [start, stop) "
                "and optionally `layer`, `n_experts`, `hook`, e.g. "
                "{'layer': 0, 'n_experts': 8, 'columns': [0, 2]}"
            )
        start, stop = (int(c) for c in entry["columns"])
        n_exp = entry.get("n_experts")
        layer = entry.get("layer")
        if layer is None:
            layer = hook_layer(entry["hook"]) if entry.get("hook") else None
        layers.append(
            ExpertLayer(
                hook=entry.get("hook"),
                layer=i if layer is None else int(layer),
                n_experts=None if n_exp is None else int(n_exp),
                columns=(start, stop),
            )
        )
    spans = sorted(lay.columns for lay in layers)
    bad = [s for s in spans if not 0 <= s[0] < s[1] <= width]
    overlap = any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False))
    if not layers or bad or overlap or any((lay.n_experts or 1) < 1 for lay in layers):
        raise CrossdiffError(
            f"{where}: {entries!r} does not fit the experts row of width {width}; each layer "
            "needs columns [start, stop) inside the row, not overlapping, and n_experts >= 1"
        )
    if len({lay.layer for lay in layers}) != len(layers):
        raise CrossdiffError(f"{where}: {entries!r} names a layer twice; give each layer once")
    return tuple(layers)


def resolve_layout(
    explicit: list[Any] | None, manifest: dict[str, Any] | None, width: int
) -> tuple[tuple[ExpertLayer, ...], str]:
    """The layers of an experts row of `width` columns, and where that came from.

    Order: the caller's `expert_layout`; the store manifest's `experts.layout`; for older stores,
    the manifest's expert `hooks` when the width splits evenly among them; else one layer.
    """
    if explicit is not None:
        return _parse_layout(list(explicit), width, "expert_layout"), "expert_layout argument"
    experts = (manifest or {}).get("experts") or {}
    if experts.get("layout"):
        return _parse_layout(experts["layout"], width, "manifest experts.layout"), "manifest"
    hooks = list(experts.get("hooks") or [])
    if len(hooks) > 1 and width % len(hooks) == 0:
        k = width // len(hooks)
        entries = [{"hook": h, "columns": [i * k, (i + 1) * k]} for i, h in enumerate(hooks)]
        return (
            _parse_layout(entries, width, "manifest experts.hooks"),
            "inferred from the manifest's expert hooks (store without experts.layout)",
        )
    hook = hooks[0] if len(hooks) == 1 else None
    layer = hook_layer(hook) if hook else None
    single = ExpertLayer(hook, 0 if layer is None else layer, None, (0, width))
    return (single,), "one layer (no column-to-layer map)"


class ExpertAccumulator:
    """Counts, per latent and (layer, expert), the routed slots of the tokens where it fires."""

    def __init__(
        self, explicit: list[Any] | None, manifest: dict[str, Any] | None, d_sae: int, device: Any
    ) -> None:
        self.explicit, self.manifest = explicit, manifest
        self.d_sae, self.device = d_sae, device
        self.layers: tuple[ExpertLayer, ...] = ()
        self.source = ""
        self.counts: list[Tensor] = []  # per layer [d_sae, n_experts]
        self.tokens: list[Tensor] = []  # per layer [n_experts]
        self.fires: list[Tensor] = []  # per layer [d_sae]: firing tokens with routing recorded

    def _start(self, width: int) -> None:
        self.layers, self.source = resolve_layout(self.explicit, self.manifest, width)
        f64 = dict(dtype=torch.float64, device=self.device)
        for lay in self.layers:
            self.counts.append(torch.zeros(self.d_sae, lay.n_experts or 0, **f64))
            self.tokens.append(torch.zeros(lay.n_experts or 0, **f64))
            self.fires.append(torch.zeros(self.d_sae, **f64))

    def update(
        self,
        experts: Int[Tensor, "batch width"],
        rows: Int[Tensor, " nnz"],
        cols: Int[Tensor, " nnz"],
    ) -> None:
        if not self.layers:
            self._start(int(experts.shape[1]))
        for g, lay in enumerate(self.layers):
            part = experts[:, lay.columns[0] : lay.columns[1]]
            top = int(part.max()) + 1 if part.numel() else 0
            width = self.counts[g].shape[1]
            if top > width:
                if lay.n_experts is not None:
                    raise CrossdiffError(
                        f"expert id {top - 1} in layer {lay.layer} (columns {list(lay.columns)}) "
                        f"but the layout says that layer has {lay.n_experts} experts; pass an "
                        "expert_layout that matches the recorded experts"
                    )
                self.counts[g] = torch.nn.functional.pad(self.counts[g], (0, top - width))
                self.tokens[g] = torch.nn.functional.pad(self.tokens[g], (0, top - width))
                width = top
            chosen = part[rows]  # [nnz, top_k]: every slot of every firing counts once
            ok = chosen >= 0
            flat = (cols[:, None] * width + chosen)[ok]
            self.counts[g] += torch.bincount(flat, minlength=self.d_sae * width).view(
                self.d_sae, width
            )
            self.tokens[g] += torch.bincount(part[part >= 0], minlength=width)
            self.fires[g] += torch.bincount(cols[ok.any(-1)], minlength=self.d_sae)

    def result(self) -> ExpertCounts | None:
        if not self.layers or all(c.shape[1] == 0 for c in self.counts):
            return None
        layers = tuple(
            ExpertLayer(lay.hook, lay.layer, int(c.shape[1]), lay.columns)
            for lay, c in zip(self.layers, self.counts, strict=True)
        )
        return ExpertCounts(
            layers=layers,
            source=self.source,
            counts=[c.cpu().numpy() for c in self.counts],
            tokens=[t.cpu().numpy() for t in self.tokens],
            fires=np.stack([f.cpu().numpy() for f in self.fires], axis=1),
        )


@dataclass
class ExpertCounts:
    """What the pass counted, per layer (n_experts filled in from the ids seen when unknown)."""

    layers: tuple[ExpertLayer, ...]
    source: str
    counts: list[np.ndarray]  # per layer [d_sae, n_experts]: routed slots where the latent fires
    tokens: list[np.ndarray]  # per layer [n_experts]: routed slots over all analysed tokens
    fires: np.ndarray  # [d_sae, n_layers]: firing tokens with routing recorded in that layer

    @property
    def flat_counts(self) -> np.ndarray:
        """[d_sae, n_pairs], layer-major (layer 0's experts, then layer 1's, ...)."""
        return np.concatenate(self.counts, axis=1)

    @property
    def flat_tokens(self) -> np.ndarray:
        return np.concatenate(self.tokens)


def miller_madow_entropy(counts: Float[np.ndarray, "*batch n"]) -> Float[np.ndarray, "*batch"]:
    """Entropy in bits of each row of counts, with the Miller-Madow correction (m - 1) / (2 N ln 2)
    for m observed categories out of N observations; NaN for an empty row. The plug-in estimate
    is biased low by about that much; the result is clipped to [0, log2 n]."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = counts / total[..., None]
        plug_in = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
        m = (counts > 0).sum(-1)
        corrected = plug_in + (m - 1) / (2 * total * _LN2)
    n = counts.shape[-1]
    corrected = np.clip(corrected, 0.0, math.log2(n) if n > 1 else 0.0)
    return np.where(total > 0, corrected, np.nan)


def routing_kl(
    counts: Float[np.ndarray, "*batch n"], base: Float[np.ndarray, " n"]
) -> Float[np.ndarray, "*batch"]:
    """KL(p || base) in bits of each row's distribution against a base distribution, less the
    same Miller-Madow bias term (the plug-in KL against a known base is biased high by it),
    clipped at 0; NaN for an empty row."""
    counts = np.asarray(counts, dtype=np.float64)
    base = np.asarray(base, dtype=np.float64)
    total = counts.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = counts / total[..., None]
        ratio = np.where(p > 0, p / np.where(base > 0, base, np.inf), 1.0)
        plug_in = np.where(p > 0, p * np.log2(np.where(p > 0, ratio, 1.0)), 0.0).sum(-1)
        m = (counts > 0).sum(-1)
        corrected = np.maximum(plug_in - (m - 1) / (2 * total * _LN2), 0.0)
    return np.where(total > 0, corrected, np.nan)


@dataclass
class Attribution:
    """Per latent: its top (layer, expert) pair and the numbers of that layer; per layer arrays."""

    top_layer: np.ndarray  # [d_sae] layer id of the most divergent layer, -1 if none
    top_expert: np.ndarray  # [d_sae] expert within that layer, -1 if none
    share: np.ndarray  # [d_sae] share of that layer's routed slots going to the top expert
    lift: np.ndarray  # [d_sae] share / base rate
    kl: np.ndarray  # [d_sae] bias-corrected KL (bits) of that layer
    entropy: np.ndarray  # [d_sae] Miller-Madow entropy (bits) of that layer
    firings: np.ndarray  # [d_sae] firing tokens with routing recorded (most of any layer)
    kl_per_layer: np.ndarray  # [d_sae, n_layers], NaN below the minimum
    entropy_per_layer: np.ndarray  # [d_sae, n_layers], NaN below the minimum
    below_min: np.ndarray  # [d_sae] bool: fires, but below the minimum in every layer


def attribute(ec: ExpertCounts, min_firings: int) -> Attribution:
    """The (layer, expert) attribution of every latent.

    Per layer where the latent fired at least `min_firings` times: its bias-corrected KL against
    the layer's base rate. Its top layer is the one with the largest KL; its top expert there is
    the one contributing most to that KL (p log2(p / q)), i.e. over-represented and frequent.
    """
    if min_firings < 1:
        raise CrossdiffError(f"min_expert_firings must be >= 1, got {min_firings}")
    d_sae, n_layers = ec.fires.shape
    enough = ec.fires >= min_firings
    kl = np.full((d_sae, n_layers), np.nan)
    ent = np.full((d_sae, n_layers), np.nan)
    for g in range(n_layers):
        base = ec.tokens[g] / max(ec.tokens[g].sum(), 1.0)
        kl[:, g] = np.where(enough[:, g], routing_kl(ec.counts[g], base), np.nan)
        ent[:, g] = np.where(enough[:, g], miller_madow_entropy(ec.counts[g]), np.nan)
    has = np.isfinite(kl).any(1)
    best = np.argmax(np.where(np.isfinite(kl), kl, -np.inf), axis=1)
    top_layer = np.full(d_sae, -1, dtype=np.int64)
    top_expert = np.full(d_sae, -1, dtype=np.int64)
    share, lift = np.full(d_sae, np.nan), np.full(d_sae, np.nan)
    for g, lay in enumerate(ec.layers):
        rows = np.nonzero(has & (best == g))[0]
        if not len(rows):
            continue
        c = ec.counts[g][rows]
        p = c / c.sum(1, keepdims=True)
        q = ec.tokens[g] / max(ec.tokens[g].sum(), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            contrib = np.where(p > 0, p * np.log2(p / np.where(q > 0, q, np.inf)), -np.inf)
        e = contrib.argmax(1)
        top_layer[rows] = lay.layer
        top_expert[rows] = e
        share[rows] = p[np.arange(len(rows)), e]
        lift[rows] = share[rows] / q[e]
    pick = np.clip(best, 0, n_layers - 1)[:, None]
    kl_top = np.where(has, np.take_along_axis(kl, pick, 1)[:, 0], np.nan)
    ent_top = np.where(has, np.take_along_axis(ent, pick, 1)[:, 0], np.nan)
    fired = ec.fires.max(1)
    return Attribution(
        top_layer=top_layer, top_expert=top_expert, share=share, lift=lift, kl=kl_top,
        entropy=ent_top, firings=fired.astype(np.int64), kl_per_layer=kl,
        entropy_per_layer=ent, below_min=(fired > 0) & ~has,
    )  # fmt: skip


def add_expert_columns(table: Any, att: Attribution) -> None:
    """The table's expert columns (see docs/report.md)."""
    table["top_expert_layer"] = att.top_layer
    table["top_expert"] = att.top_expert
    table["top_expert_share"] = att.share
    table["top_expert_lift"] = att.lift
    table["expert_kl"] = att.kl
    table["expert_entropy"] = att.entropy
    table["expert_firings"] = att.firings


def _mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _class_lift(ec: ExpertCounts, members: np.ndarray, min_firings: int) -> list[list[Any]]:
    """Per layer and expert: the routing share where the class's latents fire (pooled over those
    with at least `min_firings` firings in that layer) over the layer's base rate; None if none."""
    out: list[list[Any]] = []
    for g in range(len(ec.layers)):
        rows = members & (ec.fires[:, g] >= min_firings)
        pooled = ec.counts[g][rows].sum(0)
        base = ec.tokens[g] / max(ec.tokens[g].sum(), 1.0)
        if pooled.sum() <= 0:
            out.append([None] * len(base))
            continue
        share = pooled / pooled.sum()
        out.append([float(s / q) if q > 0 else None for s, q in zip(share, base, strict=True)])
    return out


def expert_summary(
    ec: ExpertCounts, att: Attribution, labels: np.ndarray, classes: list[str], min_firings: int
) -> dict[str, Any]:
    """summary['experts'] (keys in docs/report.md)."""
    n_experts = [int(lay.n_experts or 0) for lay in ec.layers]
    base = [t / max(t.sum(), 1.0) for t in ec.tokens]
    base_entropy = [float(miller_madow_entropy(t)) if t.sum() > 0 else None for t in ec.tokens]
    finite = [h for h in base_entropy if h is not None]
    per_class = [c for c in classes if (labels == c).any()]
    return {
        "recorded": True,
        "layout_source": ec.source,
        "layout": [lay.to_dict() for lay in ec.layers],
        "layers": [lay.layer for lay in ec.layers],
        "n_layers": len(ec.layers),
        "n_experts_per_layer": n_experts,
        "n_experts": n_experts[0] if len(set(n_experts)) == 1 else max(n_experts),
        "n_pairs": int(sum(n_experts)),
        "max_entropy": float(np.log2(max(n_experts))) if max(n_experts) > 0 else None,
        "routing_base_rate": [b.tolist() for b in base],
        "routing_share": np.concatenate(base).tolist(),
        "routing_entropy_per_layer": base_entropy,
        "routing_entropy": float(np.mean(finite)) if finite else None,
        "min_firings": int(min_firings),
        "n_below_min_firings": int(att.below_min.sum()),
        "below_min_firings_per_class": {
            c: int(att.below_min[labels == c].sum()) for c in per_class
        },
        "mean_entropy_per_class": {c: _mean(att.entropy[labels == c]) for c in per_class},
        "mean_kl_per_class": {c: _mean(att.kl[labels == c]) for c in per_class},
        "mean_lift_per_class": {c: _mean(att.lift[labels == c]) for c in per_class},
        "mean_kl_per_class_per_layer": {
            c: [_mean(att.kl_per_layer[labels == c, g]) for g in range(len(ec.layers))]
            for c in per_class
        },
        "mean_entropy_per_class_per_layer": {
            c: [_mean(att.entropy_per_layer[labels == c, g]) for g in range(len(ec.layers))]
            for c in per_class
        },
        "class_lift": {c: _class_lift(ec, labels == c, min_firings) for c in per_class},
        "method": (
            "per latent and MoE layer, the routed experts of the tokens where it fires (each top-k "
            "slot once) against that layer's routing over all analysed tokens; top pair: the layer "
            "with the largest KL, and there the expert contributing most to it; KL and entropy "
            "in bits with the Miller-Madow correction (m - 1) / (2 N ln 2); nothing is attributed "
            f"in a layer where the latent fired fewer than {min_firings} times"
        ),
    }


def expert_detail(ec: ExpertCounts, latent: int) -> list[dict[str, Any]]:
    """Per layer: the latent's routed counts, shares and lifts (for the report's panels)."""
    out = []
    for g, lay in enumerate(ec.layers):
        c = ec.counts[g][latent]
        q = ec.tokens[g] / max(ec.tokens[g].sum(), 1.0)
        p = c / c.sum() if c.sum() > 0 else np.zeros_like(c)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(q > 0, p / np.where(q > 0, q, 1.0), np.nan)
        out.append(
            {
                "layer": lay.layer,
                "hook": lay.hook,
                "firings": int(ec.fires[latent, g]),
                "counts": c.astype(int).tolist(),
                "share": p.tolist(),
                "lift": [None if not np.isfinite(v) else float(v) for v in lift],
            }
        )
    return out
