"""Corpora (three labelled domains), tokenizer, and packed token sets."""

from crossdiff.data.corpus import Document, check_documents, corpus_stats
from crossdiff.data.embedded import DEFAULT_CHARS_PER_DOMAIN, embedded_corpus
from crossdiff.data.hf import DEFAULT_HF_SOURCES, DomainSource, hf_corpus
from crossdiff.data.packing import build_token_set, pack_documents, split_documents
from crossdiff.data.prepare import DATA_PRESETS, PreparedData, prepare_data
from crossdiff.data.tokenizer import CrossdiffTokenizer, load_tokenizer, train_tokenizer
from crossdiff.data.tokens import DOMAINS, TokenSet

__all__ = [
    "DATA_PRESETS",
    "DEFAULT_CHARS_PER_DOMAIN",
    "DEFAULT_HF_SOURCES",
    "DOMAINS",
    "CrossdiffTokenizer",
    "Document",
    "DomainSource",
    "PreparedData",
    "TokenSet",
    "build_token_set",
    "check_documents",
    "corpus_stats",
    "embedded_corpus",
    "hf_corpus",
    "load_tokenizer",
    "pack_documents",
    "prepare_data",
    "split_documents",
    "train_tokenizer",
]
