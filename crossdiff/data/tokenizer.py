"""The tokenizer both models share: a byte-level BPE trained here, or a Hugging Face tokenizer.

Either way it is a `tokenizers.Tokenizer` underneath, saved as `dir/tokenizer.json` (the format
`tokenizers` and `transformers` read) plus `dir/crossdiff_tokenizer.json` (name, BOS token,
fingerprint), so a saved folder loads without `transformers` and without a network.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from crossdiff.data.corpus import Document
from crossdiff.plumbing.common import CrossdiffError, atomic_path, read_json, write_json_atomic

BOS_TOKEN = "<|bos|>"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "crossdiff_tokenizer.json"
MIN_VOCAB_SIZE = 256 + 1  # every byte, plus BOS


def _fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the vocabulary and merges: equal fingerprints mean equal token ids."""
    model = json.loads(tokenizer.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    payload = json.dumps({"type": model.get("type"), "vocab": vocab, "merges": merges})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class CrossdiffTokenizer:
    """`encode(text)` gives ids without BOS; the packer puts BOS (`bos_token_id`) at row starts."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str, name: str) -> None:
        bos_id = tokenizer.token_to_id(bos_token)
        if bos_id is None:
            raise CrossdiffError(
                f"tokenizer {name!r} has no token {bos_token!r} to use as BOS; "
                "give a tokenizer with a BOS (or end-of-text) special token"
            )
        self.backend = tokenizer
        self.bos_token = bos_token
        self.bos_token_id = bos_id
        self.name = name
        self.fingerprint = _fingerprint(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / TOKENIZER_FILE) as tmp:
            self.backend.save(str(tmp))
        meta = {
            "format": "crossdiff.Tokenizer/1",
            "name": self.name,
            "bos_token": self.bos_token,
            "bos_token_id": self.bos_token_id,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
        }
        write_json_atomic(directory / META_FILE, meta)
        return directory / TOKENIZER_FILE

    def __repr__(self) -> str:
        return (
            f"CrossdiffTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"bos_token={self.bos_token!r}, fingerprint={self.fingerprint!r})"
        )


def train_tokenizer(
    docs: Iterable[Document] | Iterable[str],
    vocab_size: int = 4096,
    *,
    seed: int = 0,
    min_frequency: int = 2,
    name: str | None = None,
) -> CrossdiffTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, no prefix space) with a BOS token.

    Training is deterministic for given texts; `seed` only fixes the order texts are fed in.
    """
    texts = [d.text if isinstance(d, Document) else d for d in docs]
    if not any(texts):
        raise CrossdiffError("cannot train a tokenizer on an empty corpus; give some documents")
    if vocab_size < MIN_VOCAB_SIZE:
        raise CrossdiffError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + BOS); the tiny default is 4096"
        )
    random.Random(seed).shuffle(texts)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars print blank lines to stdout
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return CrossdiffTokenizer(tokenizer, BOS_TOKEN, name or f"crossdiff-bpe-{vocab_size}")


def _load_saved(path: Path) -> CrossdiffTokenizer:
    directory = path if path.is_dir() else path.parent
    file = path if path.is_file() else path / TOKENIZER_FILE
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for a damaged file
        raise CrossdiffError(f"cannot read tokenizer file {file}: {err}; re-create it") from err
    meta_path = directory / META_FILE
    if meta_path.exists():
        meta = read_json(meta_path, "tokenizer metadata")
        return CrossdiffTokenizer(tokenizer, meta["bos_token"], meta["name"])
    # a bare tokenizer.json from elsewhere: use its first special token as BOS
    special = [t for t in json.loads(tokenizer.to_str()).get("added_tokens", []) if t["special"]]
    if not special:
        raise CrossdiffError(
            f"tokenizer {file} has no special token to use as BOS; add one (e.g. '<|bos|>')"
        )
    return CrossdiffTokenizer(tokenizer, special[0]["content"], str(file))


def _load_hf(name: str) -> CrossdiffTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise CrossdiffError(
            f"loading the Hugging Face tokenizer {name!r} needs the `transformers` package; "
            "pip install transformers, or give the folder of a saved crossdiff tokenizer"
        ) from err
    try:
        hf = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # OSError offline, ValueError for unknown names, ...
        raise CrossdiffError(
            f"could not load the Hugging Face tokenizer {name!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the name and your network "
            "(or HF_HUB_OFFLINE), or give the folder of a saved tokenizer"
        ) from err
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise CrossdiffError(
            f"{name!r} has only a slow (Python) tokenizer; crossdiff needs a fast one "
            "(a tokenizer.json); convert it with transformers or choose another"
        )
    bos = hf.bos_token or hf.eos_token
    if bos is None:
        raise CrossdiffError(f"tokenizer {name!r} has neither a BOS nor an EOS token to use as BOS")
    return CrossdiffTokenizer(backend, bos, name)


def load_tokenizer(path_or_name: str | Path) -> CrossdiffTokenizer:
    """A folder or tokenizer.json saved by crossdiff (or `tokenizers`), else a HF tokenizer name."""
    path = Path(path_or_name)
    if path.exists():
        if path.is_dir() and not (path / TOKENIZER_FILE).exists():
            raise CrossdiffError(f"{path} is a folder without a {TOKENIZER_FILE}")
        return _load_saved(path)
    return _load_hf(str(path_or_name))
