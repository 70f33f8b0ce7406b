"""Corpora (three labelled domains), tokenizer, and packed token sets."""

from crossdiff.data.tokens import DOMAINS, TokenSet

__all__ = ["DOMAINS", "TokenSet"]
