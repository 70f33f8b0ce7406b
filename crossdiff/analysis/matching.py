"""One-to-one matching of two crosscoders' latents by decoder direction.

Matching (`match_latents`). Both crosscoders read the same models, so a latent's decoder vector
for model m can be compared across the two crosscoders in m's own space. The similarity of two
latents is the minimum, over the models where BOTH latents write with non-negligible norm, of
their per-model cosines. "Non-negligible" is at least PRESENCE (a quarter) of the latent's
largest per-model norm, in the crosscoder's normalized units. Why not the minimum over all
models: an exclusive latent's vector in its absent model is near zero and trained by little
signal, so its direction is noise, and a minimum over it would veto the match of two copies of
the same exclusive feature. Why a quarter: at the paper's split (0.3 / 0.7) a shared latent's
weaker norm is at least 0.43 of its stronger one, so every shared latent counts both models,
and a latent whose weaker side is under a quarter is exclusive by any usual split. Two latents
with no model in common (one A-only, one B-only) do not match. A feature that is A-only in one
seed and shared in the other matches by its A vector; whether it kept its class is what the
stability figure asks.

One-to-one by greedy assignment on candidate pairs in descending similarity: each latent keeps
its TOP_CANDIDATES most similar partners above min_cosine (computed in chunks, so memory stays
at chunk x d_sae), and a pair is taken when both are still free. Above a cosine of 0.7 a latent
rarely has two plausible partners, so greedy and Hungarian agree on almost every pair, and
greedy scales to 25k latents where a dense 25k x 25k assignment does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int

from crossdiff.plumbing.common import CrossdiffError

PRESENCE = 0.25
TOP_CANDIDATES = 8
_CHUNK = 512


def _decoder(cc: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit decoder vectors [d_sae, n_models, d_model], presence [d_sae, n_models])."""
    w = getattr(cc, "W_dec", None)
    if w is None or w.ndim != 3:
        raise CrossdiffError(
            "match_latents needs crosscoders with W_dec [d_sae, n_models, d_model]; got "
            f"{type(cc).__name__} with W_dec of shape {None if w is None else tuple(w.shape)}"
        )
    w = w.detach().float().cpu()
    norms = cc.decoder_norms().detach().float().cpu() if hasattr(cc, "decoder_norms") else None
    if norms is None:
        norms = w.norm(dim=-1)
    unit = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    top = norms.max(dim=-1, keepdim=True).values
    present = (norms >= PRESENCE * top) & (top > 0)
    return unit, present


def _candidates(
    ref: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor],
    rows: np.ndarray, cols: np.ndarray, min_cosine: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(ref index, other index, similarity) of each ref latent's best partners >= min_cosine."""
    (u_r, p_r), (u_o, p_o) = ref, other
    u_o, p_o = u_o[cols], p_o[cols]
    keep = min(TOP_CANDIDATES, len(cols))
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(rows), _CHUNK):
        ids = rows[start : start + _CHUNK]
        cos = torch.einsum("imd,jmd->ijm", u_r[ids], u_o)
        both = p_r[ids][:, None, :] & p_o[None, :, :]
        sim = torch.where(both, cos, torch.inf).min(dim=-1).values
        sim = torch.where(both.any(-1), sim, -torch.inf)
        best, where = sim.topk(keep, dim=1)
        ok = best >= min_cosine
        out_i.append(np.repeat(ids, keep).reshape(-1, keep)[ok.numpy()])
        out_j.append(cols[where[ok].numpy()])
        out_s.append(best[ok].numpy())
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def match_latents(
    cc_ref: Any,
    cc_other: Any,
    *,
    min_cosine: float = 0.7,
    ref_live: Bool[np.ndarray, " d_sae"] | None = None,
    other_live: Bool[np.ndarray, " d_sae_other"] | None = None,
) -> Int[np.ndarray, " d_sae"]:
    """For each latent of cc_ref, the index of its one-to-one match in cc_other, or -1.

    Similarity: the minimum per-model decoder cosine over the models where both latents write
    (see the module docstring); a match needs at least `min_cosine`. ref_live / other_live:
    latents to consider (e.g. the non-dead ones of a diff); default every latent with a nonzero
    decoder. The two crosscoders must read the same number of models at the same width.
    """
    if not -1.0 <= min_cosine <= 1.0:
        raise CrossdiffError(f"min_cosine={min_cosine} must be a cosine in [-1, 1], e.g. 0.7")
    ref, other = _decoder(cc_ref), _decoder(cc_other)
    if ref[0].shape[1:] != other[0].shape[1:]:
        raise CrossdiffError(
            f"the crosscoders read different models: W_dec {tuple(ref[0].shape)} vs "
            f"{tuple(other[0].shape)}; match crosscoders trained on the same activations"
        )
    rows = _live(ref, ref_live, "ref_live")
    cols = _live(other, other_live, "other_live")
    match = np.full(ref[0].shape[0], -1, dtype=np.int64)
    if not len(rows) or not len(cols):
        return match
    i, j, s = _candidates(ref, other, rows, cols, min_cosine)
    taken = np.zeros(other[0].shape[0], dtype=bool)
    for k in np.argsort(-s, kind="stable"):
        if match[i[k]] < 0 and not taken[j[k]]:
            match[i[k]] = j[k]
            taken[j[k]] = True
    return match


def _live(dec: tuple[torch.Tensor, torch.Tensor], live: np.ndarray | None, name: str) -> np.ndarray:
    has_vector = dec[1].any(-1).numpy()
    if live is None:
        return np.nonzero(has_vector)[0]
    live = np.asarray(live, dtype=bool)
    if live.shape != has_vector.shape:
        raise CrossdiffError(f"{name} must have one entry per latent ({len(has_vector)})")
    return np.nonzero(live & has_vector)[0]
