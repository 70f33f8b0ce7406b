"""The token rows a harvest reads: per-token documents, positions and domains, which positions
it keeps (BOS dropped), and the document split that holds some documents out of training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from crossdiff.data.tokens import TokenSet, token_fingerprint
from crossdiff.plumbing.common import CrossdiffError


@dataclass
class TokenRows:
    """Token rows with per-token metadata and the mask of positions to keep."""

    tokens: Tensor  # [n_seq, seq_len]
    doc_ids: Tensor
    positions: Tensor
    domains: Tensor  # [n_seq]
    domain_names: tuple[str, ...]
    keep: Tensor  # [n_seq, seq_len] bool

    @property
    def fingerprint(self) -> str:
        return token_fingerprint(self.tokens)


def as_token_rows(token_set: TokenSet | Tensor, drop_bos: bool) -> TokenRows:
    if isinstance(token_set, TokenSet):
        tokens, doc_ids = token_set.tokens.long(), token_set.doc_ids.long()
        positions, domains = token_set.doc_positions.long(), token_set.domains.long()
        names = tuple(token_set.domain_names)
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if drop_bos:
            keep[:, 0] = False
            keep &= positions != -1
    elif isinstance(token_set, Tensor):
        check_token_tensor(token_set)
        tokens = token_set.long().cpu()
        n_seq, seq_len = tokens.shape
        doc_ids = torch.arange(n_seq).unsqueeze(1).expand(n_seq, seq_len)
        positions = torch.arange(seq_len).unsqueeze(0).expand(n_seq, seq_len)
        domains, names = torch.full((n_seq,), -1, dtype=torch.long), ()
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if drop_bos:
            keep[:, 0] = False
    else:
        raise CrossdiffError(
            f"token_set must be a crossdiff TokenSet or a LongTensor, "
            f"got {type(token_set).__name__}"
        )
    if tokens.numel() == 0:
        raise CrossdiffError("the token set is empty; build one with crossdiff.build_token_set")
    if len(tokens) and int(tokens.min()) < 0:
        raise CrossdiffError(f"token ids must be >= 0, found {int(tokens.min())}")
    return TokenRows(tokens, doc_ids, positions, domains, names, keep)


def check_token_tensor(tokens: Tensor) -> None:
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.is_complex():
        raise CrossdiffError(
            f"tokens must be an integer tensor [n_seq, seq_len], got {tokens.dtype} of "
            f"shape {tuple(tokens.shape)}; pass a TokenSet or a LongTensor of token ids"
        )


def tokens_with_domains(
    tokens: Int[Tensor, "n_seq seq_len"],
    domains: Tensor | Sequence[int],
    domain_names: Sequence[str] | None = None,
) -> TokenSet:
    """A plain token tensor and one domain per row as a TokenSet: each row is one document
    (doc_ids = row index, positions = column index, as harvest records a plain tensor), its
    domain `domain_names[domains[row]]`, and -1 for a row of no domain. Names default to
    domain_0, domain_1, ..."""
    check_token_tensor(tokens)
    n_seq, seq_len = tokens.shape
    rows = torch.as_tensor(domains)
    if rows.dtype.is_floating_point or rows.is_complex() or tuple(rows.shape) != (n_seq,):
        raise CrossdiffError(
            f"domains must be one integer per row of the tokens, shape ({n_seq},), got "
            f"{rows.dtype} of shape {tuple(rows.shape)}; a row is one document and has one "
            "domain (-1 for none)"
        )
    rows = rows.long().cpu()
    top = int(rows.max()) if n_seq else -1
    names = (
        tuple(f"domain_{i}" for i in range(top + 1))
        if domain_names is None
        else tuple(str(n) for n in domain_names)
    )
    if len(set(names)) != len(names):
        raise CrossdiffError(f"domain_names must be different names, got {list(names)}")
    if n_seq and (int(rows.min()) < -1 or top >= len(names)):
        raise CrossdiffError(
            f"domains must lie in -1..{len(names) - 1} (an index into domain_names {list(names)},"
            f" or -1 for none), got {int(rows.min())}..{top}"
        )
    return TokenSet(
        tokens=tokens.long().cpu(),
        doc_ids=torch.arange(n_seq).unsqueeze(1).expand(n_seq, seq_len).clone(),
        doc_positions=torch.arange(seq_len).unsqueeze(0).expand(n_seq, seq_len).clone(),
        domains=rows,
        domain_names=names,
    )


def heldout_documents(
    doc_ids: Int[Tensor, "n_seq seq_len"], keep: Tensor, fraction: float, seed: int
) -> Int[Tensor, " n_heldout"]:
    """The held-out documents of a token set: a seeded choice of round(fraction * n) of its n
    documents (at least one when fraction > 0 and n >= 2, never all), sorted. It depends on the
    whole token set, not on how many tokens are harvested, so extending a harvest keeps it."""
    if not 0.0 <= fraction <= 0.5:
        raise CrossdiffError(
            f"heldout_fraction must be in [0, 0.5], got {fraction}; the default is 0.1 (0 keeps "
            "every token for training, and evaluation then reads training tokens)"
        )
    docs = torch.unique(doc_ids[keep])
    n_heldout = 0
    if fraction > 0 and len(docs) >= 2:
        n_heldout = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(int(seed)))
    return docs[order[:n_heldout]].sort().values
