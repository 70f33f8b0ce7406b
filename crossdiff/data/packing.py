"""Split documents into train and held-out, and pack each domain's tokens into BOS-led rows."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from crossdiff.data.corpus import Document, check_documents
from crossdiff.data.tokenizer import CrossdiffTokenizer
from crossdiff.data.tokens import DOMAINS, TokenSet
from crossdiff.plumbing.common import CrossdiffError

ENCODE_BATCH = 256


def split_documents(
    docs: Iterable[Document], heldout_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Seeded split by document, per domain: no document is in both parts.

    Each domain with at least two documents gives max(1, round(fraction * n)) to held-out (none
    when the fraction is 0). Both parts come out in a seeded order, domain by domain.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise CrossdiffError(
            f"heldout_fraction must be in [0, 1), got {heldout_fraction}; the default is 0.05"
        )
    docs = check_documents(docs)
    train: list[Document] = []
    heldout: list[Document] = []
    for domain in DOMAINS:
        group = [d for d in docs if d.domain == domain]
        random.Random(f"crossdiff-split-{seed}-{domain}").shuffle(group)
        n_heldout = 0
        if heldout_fraction > 0 and len(group) >= 2:
            n_heldout = min(len(group) - 1, max(1, round(heldout_fraction * len(group))))
        heldout.extend(group[:n_heldout])
        train.extend(group[n_heldout:])
    return train, heldout


def _encode(docs: Sequence[Document], tokenizer: CrossdiffTokenizer, desc: str) -> list[np.ndarray]:
    """Token ids per document, as int32 arrays (a Python list of ints costs 7x the memory)."""
    ids: list[np.ndarray] = []
    with tqdm(total=len(docs), desc=desc, unit="doc", leave=False) as bar:
        for start in range(0, len(docs), ENCODE_BATCH):
            chunk = docs[start : start + ENCODE_BATCH]
            batch = tokenizer.encode_batch([d.text for d in chunk])
            ids.extend(np.asarray(one, dtype=np.int32) for one in batch)
            bar.update(len(chunk))
    return ids


def pack_documents(
    docs: Sequence[Document],
    tokenizer: CrossdiffTokenizer,
    seq_len: int = 128,
    seed: int = 0,
    what: str = "train",
) -> tuple[TokenSet, dict[str, dict[str, int]]]:
    """Concatenate each domain's documents (in the given order) and cut rows of seq_len - 1 tokens.

    Every row gets BOS in column 0 (doc position -1, doc id of the row's first real token); a
    document may continue on the next row of its domain; the tail that does not fill a row is
    dropped. Rows of all domains are then shuffled together with `seed`.
    Returns the token set and per-domain counts (docs, chars, tokens, rows, dropped_tokens).
    """
    if seq_len < 2:
        raise CrossdiffError(f"seq_len must be at least 2 (BOS + one token), got {seq_len}")
    width = seq_len - 1
    encoded = _encode(docs, tokenizer, f"tokenizing {what}")
    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "doc_ids": [], "doc_positions": []}
    domains: list[torch.Tensor] = []
    stats: dict[str, dict[str, int]] = {}
    for index, domain in enumerate(DOMAINS):
        members = [(d, ids) for d, ids in zip(docs, encoded, strict=True) if d.domain == domain]
        n_tokens = sum(len(ids) for _, ids in members)
        n_rows = n_tokens // width
        stats[domain] = {
            "docs": len(members),
            "chars": sum(len(d.text) for d, _ in members),
            "tokens": n_tokens,
            "rows": n_rows,
            "dropped_tokens": n_tokens - n_rows * width,
        }
        if members and n_rows == 0:
            raise CrossdiffError(
                f"the {what} {domain} text has {n_tokens} tokens, fewer than one row of "
                f"seq_len - 1 = {width}; add text, lower seq_len, or raise heldout_fraction"
            )
        if n_rows == 0:
            continue
        tokens = np.concatenate([ids for _, ids in members]).astype(np.int64)
        doc_ids = np.concatenate([np.full(len(ids), d.doc_id, np.int64) for d, ids in members])
        positions = np.concatenate([np.arange(len(ids), dtype=np.int64) for _, ids in members])
        keep = n_rows * width
        for name, body in (("tokens", tokens), ("doc_ids", doc_ids), ("doc_positions", positions)):
            body = torch.from_numpy(body[:keep]).view(n_rows, width)
            first = {
                "tokens": torch.full((n_rows, 1), tokenizer.bos_token_id),
                "doc_ids": body[:, :1],
                "doc_positions": torch.full((n_rows, 1), -1),
            }[name]
            parts[name].append(torch.cat([first, body], dim=1))
        domains.append(torch.full((n_rows,), index))
    if not domains:
        raise CrossdiffError(f"the {what} documents gave no tokens; the corpus text is empty")
    n_rows_total = sum(len(d) for d in domains)
    order = torch.randperm(n_rows_total, generator=torch.Generator().manual_seed(seed))
    token_set = TokenSet(
        tokens=torch.cat(parts["tokens"])[order],
        doc_ids=torch.cat(parts["doc_ids"])[order],
        doc_positions=torch.cat(parts["doc_positions"])[order],
        domains=torch.cat(domains)[order],
        domain_names=DOMAINS,
    )
    return token_set, stats


def build_token_set(
    docs: Iterable[Document],
    tokenizer: CrossdiffTokenizer,
    seq_len: int = 128,
    heldout_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[TokenSet, TokenSet]:
    """(train, held-out) token sets from one corpus; see split_documents and pack_documents.

    With heldout_fraction=0 the held-out set has no rows.
    """
    train_docs, heldout_docs = split_documents(docs, heldout_fraction, seed)
    train, _ = pack_documents(train_docs, tokenizer, seq_len, seed, "train")
    if heldout_docs:
        heldout, _ = pack_documents(heldout_docs, tokenizer, seq_len, seed + 1, "held-out")
    else:
        heldout = empty_token_set(seq_len)
    return train, heldout


def empty_token_set(seq_len: int) -> TokenSet:
    empty = torch.zeros((0, seq_len), dtype=torch.long)
    return TokenSet(empty, empty.clone(), empty.clone(), torch.zeros(0, dtype=torch.long))
