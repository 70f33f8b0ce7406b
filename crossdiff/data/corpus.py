"""A corpus is a list of `Document`s, each labelled with one of `DOMAINS`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from crossdiff.data.tokens import DOMAINS
from crossdiff.plumbing.common import CrossdiffError


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    doc_id: int


def check_documents(docs: Iterable[Document], what: str = "corpus") -> list[Document]:
    """Return `docs` as a list after checking it is non-empty, labelled and uniquely numbered."""
    docs = list(docs)
    if not docs:
        raise CrossdiffError(
            f"the {what} is empty: expected at least one document per domain {DOMAINS}; "
            "check the dataset paths, columns and size options"
        )
    bad = sorted({d.domain for d in docs if d.domain not in DOMAINS})
    if bad:
        raise CrossdiffError(f"documents with unknown domains {bad}; expected one of {DOMAINS}")
    ids = Counter(d.doc_id for d in docs)
    repeated = [doc_id for doc_id, n in ids.items() if n > 1]
    if repeated:
        raise CrossdiffError(
            f"doc_id {repeated[0]} is used by {ids[repeated[0]]} documents; every document "
            "needs its own doc_id (renumber them, e.g. with enumerate)"
        )
    return docs


def corpus_stats(docs: Iterable[Document]) -> dict[str, dict[str, int]]:
    """Documents and characters per domain."""
    stats = {domain: {"docs": 0, "chars": 0} for domain in DOMAINS}
    for doc in docs:
        stats[doc.domain]["docs"] += 1
        stats[doc.domain]["chars"] += len(doc.text)
    return stats
