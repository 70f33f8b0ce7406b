"""TokenSet: packed token rows with per-token document ids and positions, and a domain per row."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from crossdiff.plumbing.common import CrossdiffError, atomic_path

DOMAINS: tuple[str, ...] = ("code", "science", "stories")


def token_fingerprint(tokens: Int[Tensor, "n_seq seq_len"]) -> str:
    """The fingerprint of token rows: their shape and ids (32 hex digits of a sha256). A store's
    segments record it (`token_set`), so a harvest knows whether it continues the same rows."""
    digest = hashlib.sha256(str(tuple(tokens.shape)).encode())
    for rows in tokens.split(1 << 16):
        digest.update(rows.to(torch.int32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class TokenSet:
    """Rows of `seq_len` tokens. Column 0 of every row is BOS; a row never mixes domains.

    `doc_positions` is the token's offset within its document (-1 for BOS), so a harvested
    activation can be traced back to its document and place in it. `tokenizer_fingerprint`
    names the tokenizer that made the ids (None for sets saved before crossdiff recorded it), so
    a harvest can refuse models of another tokenizer.
    """

    tokens: Int[Tensor, "n_seq seq_len"]
    doc_ids: Int[Tensor, "n_seq seq_len"]
    doc_positions: Int[Tensor, "n_seq seq_len"]
    domains: Int[Tensor, " n_seq"]
    domain_names: tuple[str, ...] = DOMAINS
    tokenizer_fingerprint: str | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.tokens.shape)
        if self.tokens.ndim != 2:
            raise CrossdiffError(f"TokenSet.tokens must be [n_seq, seq_len], got shape {shape}")
        for name in ("doc_ids", "doc_positions"):
            if tuple(getattr(self, name).shape) != shape:
                raise CrossdiffError(
                    f"TokenSet.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {shape} like tokens"
                )
        if tuple(self.domains.shape) != (shape[0],):
            raise CrossdiffError(
                f"TokenSet.domains has shape {tuple(self.domains.shape)}, expected ({shape[0]},)"
            )
        if len(self.domains) and int(self.domains.max()) >= len(self.domain_names):
            raise CrossdiffError(
                f"TokenSet.domains has index {int(self.domains.max())} but only "
                f"{len(self.domain_names)} domain names {self.domain_names}"
            )
        self.domain_names = tuple(self.domain_names)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the token ids (see token_fingerprint)."""
        return token_fingerprint(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    def subset(self, rows: Tensor | slice | list[int]) -> TokenSet:
        return TokenSet(
            tokens=self.tokens[rows],
            doc_ids=self.doc_ids[rows],
            doc_positions=self.doc_positions[rows],
            domains=self.domains[rows],
            domain_names=self.domain_names,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )

    def domain_rows(self, domain: str) -> TokenSet:
        if domain not in self.domain_names:
            raise CrossdiffError(f"unknown domain {domain!r}; this set has {self.domain_names}")
        index = self.domain_names.index(domain)
        return self.subset(torch.nonzero(self.domains == index).flatten())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {
            "tokens": self.tokens.to(torch.int32).contiguous(),
            "doc_ids": self.doc_ids.to(torch.int64).contiguous(),
            "doc_positions": self.doc_positions.to(torch.int32).contiguous(),
            "domains": self.domains.to(torch.int8).contiguous(),
        }
        metadata = {"format": "crossdiff.TokenSet/1", "domain_names": json.dumps(self.domain_names)}
        if self.tokenizer_fingerprint:
            metadata["tokenizer_fingerprint"] = str(self.tokenizer_fingerprint)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenSet:
        path = Path(path)
        if not path.exists():
            raise CrossdiffError(f"token set not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "crossdiff.TokenSet/1":
                    raise CrossdiffError(
                        f"{path} is not a crossdiff token set (format={meta.get('format')!r})"
                    )
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except CrossdiffError:
            raise
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise CrossdiffError(f"cannot read token set {path}: {err}; re-create it") from err
        return cls(
            tokens=tensors["tokens"].long(),
            doc_ids=tensors["doc_ids"].long(),
            doc_positions=tensors["doc_positions"].long(),
            domains=tensors["domains"].long(),
            domain_names=tuple(json.loads(meta["domain_names"])),
            tokenizer_fingerprint=meta.get("tokenizer_fingerprint"),
        )
