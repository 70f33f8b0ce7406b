"""Seed stability: do a crosscoder's latents come back when only the crosscoder's seed changes?

Each latent of the first crosscoder (the reference: the run's main crosscoder) is matched one to
one with a latent of every other seed's crosscoder by the Hungarian algorithm
(`scipy.optimize.linear_sum_assignment`) on decoder similarity: the minimum, over the models where
both latents write, of their per-model decoder cosines (crossdiff.analysis.matching explains why
not over every model). Only live latents take part. A latent is *stable* when its match reaches
`STABLE_COSINE` in every other seed, *single-draw* otherwise. Reported: the share of live
reference latents matched at or above each cosine (0.5 / 0.7 / 0.9 and a curve), per class and
overall, averaged over the other seeds, and the stable-latent list. The anchor: Paulo and Belrose
(2025) find about 53 % of TopK SAE latents shared across seeds at cosine 0.7 in small settings.

Above HUNGARIAN_MAX live latents the dense assignment is too slow and large, and the greedy
one-to-one matching of crossdiff.analysis.replicates is used instead (the output says which).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from crossdiff.analysis.matching import _decoder, match_latents
from crossdiff.plumbing.common import CrossdiffError

THRESHOLDS = (0.5, 0.7, 0.9)
STABLE_COSINE = 0.7
HUNGARIAN_MAX = 8192
CURVE = tuple(round(0.05 * i, 2) for i in range(21))
_CHUNK = 512


def _similarity(ref: tuple, other: tuple, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """[len(rows), len(cols)] min per-model cosine over models both write to; -1 for none."""
    (u_r, p_r), (u_o, p_o) = ref, other
    u_o, p_o = u_o[cols], p_o[cols]
    out = np.empty((len(rows), len(cols)), dtype=np.float32)
    for start in range(0, len(rows), _CHUNK):
        ids = rows[start : start + _CHUNK]
        cos = torch.einsum("imd,jmd->ijm", u_r[ids], u_o)
        both = p_r[ids][:, None, :] & p_o[None, :, :]
        sim = torch.where(both, cos, torch.inf).min(dim=-1).values
        out[start : start + len(ids)] = torch.where(both.any(-1), sim, -1.0).numpy()
    return out


def matched_cosines(
    cc_ref: Any, cc_other: Any, ref_live: np.ndarray, other_live: np.ndarray
) -> tuple[np.ndarray, str]:
    """For each latent of cc_ref, the similarity of its one-to-one match in cc_other (NaN for a
    dead reference latent, -1 where it has no partner), and the method used."""
    ref, other = _decoder(cc_ref), _decoder(cc_other)
    if ref[0].shape[1:] != other[0].shape[1:]:
        raise CrossdiffError(
            f"the crosscoders read different models: W_dec {tuple(ref[0].shape)} vs "
            f"{tuple(other[0].shape)}; compare crosscoder seeds trained on the same activations"
        )
    rows = np.nonzero(np.asarray(ref_live, dtype=bool) & ref[1].any(-1).numpy())[0]
    cols = np.nonzero(np.asarray(other_live, dtype=bool) & other[1].any(-1).numpy())[0]
    out = np.full(ref[0].shape[0], np.nan)
    out[rows] = -1.0
    if not len(rows) or not len(cols):
        return out, "hungarian"
    if max(len(rows), len(cols)) > HUNGARIAN_MAX:
        match = match_latents(cc_ref, cc_other, min_cosine=-1.0, ref_live=ref_live,
                              other_live=other_live)  # fmt: skip
        for i in rows:
            if match[i] >= 0:
                out[i] = _similarity(ref, other, np.array([i]), np.array([match[i]]))[0, 0]
        return out, "greedy"
    from scipy.optimize import linear_sum_assignment

    sim = _similarity(ref, other, rows, cols)
    r, c = linear_sum_assignment(sim, maximize=True)
    out[rows[r]] = sim[r, c]
    return out, "hungarian"


def seed_stability(
    crosscoders: Sequence[Any],
    *,
    live: Sequence[np.ndarray] | None = None,
    classes: np.ndarray | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    stable_cosine: float = STABLE_COSINE,
) -> dict[str, Any]:
    """Seed stability of crosscoders[0] against every other seed (module docstring).

    live: one bool mask per crosscoder (default: every latent with a decoder vector); classes:
    the reference's class per latent, for the shares per class. JSON-ready, plus the per-latent
    arrays under "per_latent" (numpy: the worst match over the other seeds, and stable)."""
    if len(crosscoders) < 2:
        raise CrossdiffError("seed stability needs at least two crosscoder seeds")
    d_sae = int(crosscoders[0].W_dec.shape[0])
    masks = [np.ones(int(cc.W_dec.shape[0]), bool) for cc in crosscoders] if live is None else live
    per_other, methods = [], set()
    for j in range(1, len(crosscoders)):
        cos, method = matched_cosines(crosscoders[0], crosscoders[j], masks[0], masks[j])
        per_other.append(cos)
        methods.add(method)
    stack = np.stack(per_other)  # [n_other, d_sae]
    considered = np.isfinite(stack[0])
    labels = np.full(d_sae, "all", dtype=object) if classes is None else np.asarray(classes, object)
    groups = {"all": considered}
    for c in dict.fromkeys(labels[considered]):
        groups[str(c)] = considered & (labels == c)
    share = {}
    for t in thresholds:
        share[f"{t:g}"] = {g: _share(stack, m, t) for g, m in groups.items()}
    curve = {g: [_share(stack, m, t)["mean"] for t in CURVE] for g, m in groups.items()}
    worst = np.where(considered, stack.min(0), np.nan)
    stable = considered & (worst >= stable_cosine)
    return {
        "n_seeds": len(crosscoders),
        "method": "hungarian" if methods == {"hungarian"} else "greedy",
        "n_live": {g: int(m.sum()) for g, m in groups.items()},
        "share_matched": share,
        "curve": {"cosine": list(CURVE), "share": curve},
        "stable_cosine": stable_cosine,
        "n_stable": {g: int((stable & m).sum()) for g, m in groups.items()},
        "stable_latents": [int(i) for i in np.nonzero(stable)[0]],
        "per_latent": {"worst_match": worst, "stable": stable},
        "rule": __doc__.split("\n\n", 1)[1].split("\n\n", 1)[0].replace("\n", " "),
    }


def _share(stack: np.ndarray, mask: np.ndarray, t: float) -> dict[str, Any]:
    """The share of `mask`'s latents matched at >= t, per other seed and its mean."""
    n = int(mask.sum())
    per = [float((row[mask] >= t).mean()) if n else None for row in stack]
    known = [p for p in per if p is not None]
    return {"per_seed": per, "mean": float(np.mean(known)) if known else None, "n": n}
