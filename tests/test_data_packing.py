"""Packing planted documents: BOS rows, per-domain rows, doc ids and positions that trace back."""

import pytest
import torch

from crossdiff.data import (
    DOMAINS,
    Document,
    TokenSet,
    build_token_set,
    pack_documents,
    split_documents,
    train_tokenizer,
)
from crossdiff.plumbing.common import CrossdiffError

SEQ_LEN = 9


def planted_docs() -> list[Document]:
    words = {
        "code": "x = [i * {n} for i in range({n})]\nprint(sum(x))\n",
        "science": "The mean of sample {n} is {n}.5 and its variance is {n}.25 units.",
        "stories": "Once upon a time, fox number {n} found a red apple by the river.",
    }
    docs = []
    for domain, template in words.items():
        for n in range(12):
            docs.append(Document(template.format(n=n) * (1 + n % 3), domain, 100 + len(docs)))
    return docs


@pytest.fixture(scope="module")
def docs():
    return planted_docs()


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_tokenizer(docs, 300)


def test_rows_start_with_bos_and_never_mix_domains(docs, tokenizer):
    train, heldout = build_token_set(docs, tokenizer, SEQ_LEN, 0.25, seed=0)
    domain_of = {d.doc_id: DOMAINS.index(d.domain) for d in docs}
    for split in (train, heldout):
        assert split.seq_len == SEQ_LEN
        assert (split.tokens[:, 0] == tokenizer.bos_token_id).all()
        assert (split.tokens[:, 1:] != tokenizer.bos_token_id).all()
        assert (split.doc_positions[:, 0] == -1).all() and (split.doc_positions[:, 1:] >= 0).all()
        for row in range(len(split)):
            row_domains = {domain_of[int(i)] for i in split.doc_ids[row]}
            assert row_domains == {int(split.domains[row])}
        assert set(split.domains.tolist()) == {0, 1, 2}


def test_doc_ids_and_positions_give_back_each_documents_tokens(docs, tokenizer):
    token_set, stats = pack_documents(docs, tokenizer, SEQ_LEN, seed=0)
    by_id = {d.doc_id: d for d in docs}
    real = token_set.doc_positions >= 0
    seen_ids = token_set.doc_ids[real].unique().tolist()
    for doc_id in seen_ids:
        mask = (token_set.doc_ids == doc_id) & real
        positions = token_set.doc_positions[mask]
        order = positions.argsort()
        positions, tokens = positions[order], token_set.tokens[mask][order]
        expected = tokenizer.encode(by_id[doc_id].text)
        assert positions.tolist() == list(range(len(positions)))  # no gap, no repeat
        assert tokens.tolist() == expected[: len(tokens)]
        # only the last document of a domain may lose its tail
        if len(tokens) < len(expected):
            assert len(expected) - len(tokens) < SEQ_LEN - 1
    for domain in DOMAINS:
        counts = stats[domain]
        assert counts["rows"] == counts["tokens"] // (SEQ_LEN - 1)
        assert counts["rows"] * (SEQ_LEN - 1) + counts["dropped_tokens"] == counts["tokens"]
        assert counts["docs"] == 12


def test_a_document_continues_on_the_next_row_of_its_domain(docs, tokenizer):
    token_set, _ = pack_documents(docs, tokenizer, SEQ_LEN, seed=0)
    spanning = 0
    for doc_id in token_set.doc_ids[:, 1:].unique().tolist():
        blocks = []
        for row in range(len(token_set)):
            positions = token_set.doc_positions[row, 1:][token_set.doc_ids[row, 1:] == doc_id]
            if len(positions):
                assert positions.tolist() == list(range(int(positions[0]), int(positions[-1]) + 1))
                blocks.append((int(positions[0]), int(positions[-1])))
        blocks.sort()
        spanning += len(blocks) > 1
        for (_, end), (start, _) in zip(blocks, blocks[1:], strict=False):
            assert start == end + 1  # the next row picks up where the last one stopped
    assert spanning > 10


def test_split_is_by_document_and_seeded(docs, tokenizer):
    train_docs, heldout_docs = split_documents(docs, 0.25, seed=0)
    assert {d.doc_id for d in train_docs}.isdisjoint({d.doc_id for d in heldout_docs})
    assert len(train_docs) + len(heldout_docs) == len(docs)
    for domain in DOMAINS:
        assert sum(d.domain == domain for d in heldout_docs) == 3  # round(0.25 * 12)
    assert split_documents(docs, 0.25, seed=0) == (train_docs, heldout_docs)
    assert split_documents(docs, 0.25, seed=1)[1] != heldout_docs

    train, heldout = build_token_set(docs, tokenizer, SEQ_LEN, 0.25, seed=0)
    assert set(train.doc_ids.flatten().tolist()).isdisjoint(heldout.doc_ids.flatten().tolist())
    again, _ = build_token_set(docs, tokenizer, SEQ_LEN, 0.25, seed=0)
    assert torch.equal(again.tokens, train.tokens)
    reseeded, _ = build_token_set(docs, tokenizer, SEQ_LEN, 0.25, seed=5)
    assert not torch.equal(reseeded.tokens, train.tokens)


def test_rows_of_the_domains_are_interleaved(docs, tokenizer):
    token_set, _ = pack_documents(docs, tokenizer, SEQ_LEN, seed=0)
    domains = token_set.domains.tolist()
    changes = sum(a != b for a, b in zip(domains, domains[1:], strict=False))
    assert changes > len(domains) / 4  # sorted by domain would give 2


def test_no_heldout_and_save_load(docs, tokenizer, tmp_path):
    train, heldout = build_token_set(docs, tokenizer, SEQ_LEN, 0.0, seed=0)
    assert len(heldout) == 0 and heldout.seq_len == SEQ_LEN
    train.save(tmp_path / "t.safetensors")
    loaded = TokenSet.load(tmp_path / "t.safetensors")
    for name in ("tokens", "doc_ids", "doc_positions", "domains"):
        assert torch.equal(getattr(loaded, name), getattr(train, name)), name


def test_bad_input_is_a_clear_error(docs, tokenizer):
    with pytest.raises(CrossdiffError, match="seq_len must be at least 2"):
        build_token_set(docs, tokenizer, 1)
    with pytest.raises(CrossdiffError, match="heldout_fraction"):
        build_token_set(docs, tokenizer, SEQ_LEN, 1.0)
    with pytest.raises(CrossdiffError, match="empty"):
        build_token_set([], tokenizer, SEQ_LEN)
    with pytest.raises(CrossdiffError, match="fewer than one row"):
        build_token_set(docs[:2], tokenizer, 4096, 0.0)
