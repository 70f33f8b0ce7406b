"""`prepare_data`: corpus -> tokenizer -> packed train/held-out token sets, written to one folder.

Layout of `out_dir`:
    tokenizer/tokenizer.json (+ crossdiff_tokenizer.json)
    tokens_train.safetensors, tokens_heldout.safetensors   (TokenSet files)
    data.json   options, per-domain counts, tokenizer fingerprint; written last, so its presence
                marks a complete folder that a second call with the same options simply loads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from crossdiff.data.corpus import Document, check_documents, corpus_stats
from crossdiff.data.embedded import DEFAULT_CHARS_PER_DOMAIN, embedded_corpus
from crossdiff.data.hf import DomainSource, hf_corpus
from crossdiff.data.packing import empty_token_set, pack_documents, split_documents
from crossdiff.data.tokenizer import CrossdiffTokenizer, load_tokenizer, train_tokenizer
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import CrossdiffError, read_json, write_json_atomic

DATA_FORMAT = "crossdiff.Data/1"
TRAIN_FILE = "tokens_train.safetensors"
HELDOUT_FILE = "tokens_heldout.safetensors"
DATA_JSON = "data.json"
TOKENIZER_DIR = "tokenizer"

DATA_PRESETS: dict[str, dict[str, Any]] = {
    # trains on a 2-core CPU in minutes: about 2.1M tokens with the 4096-token BPE
    "tiny": {
        "source": "embedded",
        "n_chars_per_domain": DEFAULT_CHARS_PER_DOMAIN,
        "vocab_size": 4096,
        "seq_len": 128,
        "tokenizer": None,
    },
    # the seed paper: ~1B GPT-2 tokens, one third each of code, arXiv and stories
    "paper": {
        "source": "hf",
        "n_chars_per_domain": 1_300_000_000,
        "vocab_size": None,
        "seq_len": 1024,
        "tokenizer": "gpt2",
    },
}


@dataclass
class PreparedData:
    tokenizer: CrossdiffTokenizer
    train: TokenSet
    heldout: TokenSet
    paths: dict[str, Path]
    stats: dict[str, Any] = field(default_factory=dict)


def _resolve_options(
    preset: str,
    source: str | None,
    seed: int,
    n_chars_per_domain: int | None,
    vocab_size: int | None,
    seq_len: int | None,
    heldout_fraction: float,
    hf_sources: Sequence[DomainSource] | None,
    proportions: Sequence[float | int] | dict[str, float | int] | None,
    tokenizer: CrossdiffTokenizer | str | Path | None,
) -> dict[str, Any]:
    if preset not in DATA_PRESETS:
        raise CrossdiffError(
            f"unknown data preset {preset!r}; expected one of {list(DATA_PRESETS)}"
        )
    base = DATA_PRESETS[preset]
    source = source or base["source"]
    if source not in ("embedded", "hf"):
        raise CrossdiffError(f"source must be 'embedded' or 'hf', got {source!r}")
    if tokenizer is not None and vocab_size is not None:
        raise CrossdiffError(
            "give either a tokenizer to use or a vocab_size to train one, not both "
            f"(got tokenizer={tokenizer!r} and vocab_size={vocab_size})"
        )
    for name, value in (("n_chars_per_domain", n_chars_per_domain), ("seq_len", seq_len)):
        positive = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if value is not None and not positive:
            raise CrossdiffError(
                f"{name}={value!r} must be a positive integer (--{name.replace('_', '-')}); leave "
                f"it out for the preset's default ({base[name]})"
            )
    if tokenizer is None and vocab_size is None:
        tokenizer, vocab_size = base["tokenizer"], base["vocab_size"]
    if isinstance(tokenizer, CrossdiffTokenizer):
        tokenizer_option: Any = {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint}
    else:
        tokenizer_option = None if tokenizer is None else str(tokenizer)
    options = {
        "preset": preset,
        "source": source,
        "seed": seed,
        "n_chars_per_domain": (
            base["n_chars_per_domain"] if n_chars_per_domain is None else n_chars_per_domain
        ),
        "vocab_size": vocab_size,
        "tokenizer": tokenizer_option,
        "seq_len": base["seq_len"] if seq_len is None else seq_len,
        "heldout_fraction": heldout_fraction,
        "hf_sources": None if hf_sources is None else [s.to_dict() for s in hf_sources],
        "proportions": proportions,
    }
    if source == "embedded" and (hf_sources is not None or proportions is not None):
        raise CrossdiffError(
            "hf_sources and proportions apply to source='hf' only; the embedded corpus has "
            "equal character budgets per domain"
        )
    return json.loads(json.dumps(options))  # as it reads back from data.json


def _hf_documents(options: dict[str, Any], hf_sources: Sequence[DomainSource] | None) -> list:
    n_sources = len(hf_sources) if hf_sources is not None else 3
    budget = options["n_chars_per_domain"] * n_sources
    stream = hf_corpus(hf_sources, options["proportions"], seed=options["seed"])
    docs: list[Document] = []
    total = 0
    with tqdm(total=budget, desc="streaming corpus", unit="char", unit_scale=True) as bar:
        for doc in stream:
            docs.append(doc)
            total += len(doc.text)
            bar.update(len(doc.text))
            if total >= budget:
                break
    return docs


def _load_existing(out_dir: Path, paths: dict[str, Path], options: dict[str, Any]):
    manifest = read_json(paths["data_json"], "data manifest")
    if manifest.get("format") != DATA_FORMAT:
        raise CrossdiffError(f"{paths['data_json']} is not a crossdiff data manifest")
    if manifest["options"] != options:
        changed = sorted(
            k
            for k in set(options) | set(manifest["options"])
            if options.get(k) != manifest["options"].get(k)
        )
        details = ", ".join(
            f"{k}: {manifest['options'].get(k)!r} there vs {options.get(k)!r} now" for k in changed
        )
        raise CrossdiffError(
            f"{out_dir} already holds data prepared with other options ({details}); "
            "use another folder, or delete this one to rebuild"
        )
    missing = [str(p) for k, p in paths.items() if k != "dir" and not p.exists()]
    if missing:
        raise CrossdiffError(
            f"{out_dir} has {DATA_JSON} but lacks {missing}; delete {paths['data_json']} to rebuild"
        )
    prepared = PreparedData(
        tokenizer=load_tokenizer(paths["tokenizer_dir"]),
        train=TokenSet.load(paths["train"]),
        heldout=TokenSet.load(paths["heldout"]),
        paths=paths,
        stats=manifest["stats"],
    )
    if prepared.tokenizer.fingerprint != manifest["stats"]["tokenizer"]["fingerprint"]:
        raise CrossdiffError(
            f"the tokenizer in {paths['tokenizer_dir']} is not the one the tokens were made with "
            f"(fingerprint {prepared.tokenizer.fingerprint} vs "
            f"{manifest['stats']['tokenizer']['fingerprint']}); delete {out_dir} to rebuild"
        )
    for token_set in (prepared.train, prepared.heldout):  # sets saved before it was recorded
        token_set.tokenizer_fingerprint = token_set.tokenizer_fingerprint or (
            prepared.tokenizer.fingerprint
        )
    print(f"loaded prepared data from {out_dir} ({len(prepared.train)} train rows)")
    return prepared


def prepare_data(
    out_dir: str | Path,
    *,
    source: str | None = None,
    preset: str = "tiny",
    seed: int = 0,
    n_chars_per_domain: int | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    heldout_fraction: float = 0.05,
    hf_sources: Sequence[DomainSource] | None = None,
    proportions: Sequence[float | int] | dict[str, float | int] | None = None,
    tokenizer: CrossdiffTokenizer | str | Path | None = None,
) -> PreparedData:
    """Build (or load, if `out_dir` already has it) the corpus, tokenizer and token sets.

    `source` defaults to the preset's ("embedded" for tiny, "hf" for paper). `tokenizer` is a
    tokenizer, a saved folder or a Hugging Face name; without it one is trained on the train
    documents with `vocab_size` (preset default). Raises CrossdiffError if `out_dir` holds data
    prepared with different options.
    """
    options = _resolve_options(
        preset,
        source,
        seed,
        n_chars_per_domain,
        vocab_size,
        seq_len,
        heldout_fraction,
        hf_sources,
        proportions,
        tokenizer,
    )
    out_dir = Path(out_dir)
    paths = {
        "dir": out_dir,
        "tokenizer_dir": out_dir / TOKENIZER_DIR,
        "tokenizer": out_dir / TOKENIZER_DIR / "tokenizer.json",
        "train": out_dir / TRAIN_FILE,
        "heldout": out_dir / HELDOUT_FILE,
        "data_json": out_dir / DATA_JSON,
    }
    if paths["data_json"].exists():
        return _load_existing(out_dir, paths, options)

    started = time.perf_counter()
    if options["source"] == "embedded":
        docs = embedded_corpus(options["n_chars_per_domain"], seed=seed)
    else:
        docs = _hf_documents(options, hf_sources)
    docs = check_documents(docs)
    train_docs, heldout_docs = split_documents(docs, heldout_fraction, seed)
    corpus_seconds = time.perf_counter() - started

    started = time.perf_counter()
    if tokenizer is None and options["tokenizer"] is None:
        print(f"training a {options['vocab_size']}-token BPE on {len(train_docs):,} documents")
        tokenizer = train_tokenizer(train_docs, options["vocab_size"], seed=seed)
    elif not isinstance(tokenizer, CrossdiffTokenizer):
        tokenizer = load_tokenizer(options["tokenizer"])
    tokenizer_seconds = time.perf_counter() - started

    started = time.perf_counter()
    seq = options["seq_len"]
    train, train_stats = pack_documents(train_docs, tokenizer, seq, seed, "train")
    if heldout_docs:
        heldout, heldout_stats = pack_documents(heldout_docs, tokenizer, seq, seed + 1, "held-out")
    else:
        heldout, heldout_stats = empty_token_set(seq), {}
    train.tokenizer_fingerprint = heldout.tokenizer_fingerprint = tokenizer.fingerprint
    pack_seconds = time.perf_counter() - started

    from crossdiff import __version__

    stats = {
        "corpus": corpus_stats(docs),
        "train": train_stats,
        "heldout": heldout_stats,
        "train_rows": len(train),
        "heldout_rows": len(heldout),
        "train_tokens": train.n_tokens,
        "heldout_tokens": heldout.n_tokens,
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_token": tokenizer.bos_token,
            "bos_token_id": tokenizer.bos_token_id,
            "fingerprint": tokenizer.fingerprint,
        },
        "seconds": {
            "corpus": round(corpus_seconds, 2),
            "tokenizer": round(tokenizer_seconds, 2),
            "packing": round(pack_seconds, 2),
        },
    }
    tokenizer.save(paths["tokenizer_dir"])
    train.save(paths["train"])
    heldout.save(paths["heldout"])
    manifest = {
        "format": DATA_FORMAT,
        "crossdiff_version": __version__,
        "options": options,
        "stats": stats,
        "files": {k: p.relative_to(out_dir).as_posix() for k, p in paths.items() if k != "dir"},
    }
    write_json_atomic(paths["data_json"], manifest)
    _print_summary(paths, stats)
    return PreparedData(tokenizer=tokenizer, train=train, heldout=heldout, paths=paths, stats=stats)


def _print_summary(paths: dict[str, Path], stats: dict[str, Any]) -> None:
    for domain, counts in stats["train"].items():
        held = stats["heldout"].get(domain, {})
        print(
            f"  {domain:8s} {counts['docs']:>7,} docs {counts['chars']:>13,} chars "
            f"{counts['tokens']:>12,} tokens -> {counts['rows']:,} train rows, "
            f"{held.get('rows', 0):,} held-out rows"
        )
    print(f"wrote tokenizer ({stats['tokenizer']['name']}) to {paths['tokenizer']}")
    print(f"wrote {stats['train_rows']:,} train rows to {paths['train']}")
    print(f"wrote {stats['heldout_rows']:,} held-out rows to {paths['heldout']}")
    print(f"wrote {paths['data_json']}")


def load_prepared_data(folder: str | Path) -> PreparedData:
    """A folder written by `prepare_data` (any options), loaded and checked as it is."""
    folder = Path(folder)
    if not (folder / DATA_JSON).exists():
        raise CrossdiffError(
            f"{folder} holds no prepared data (no {DATA_JSON}); write it with "
            f"`crossdiff prepare-data --out {folder}` or give another folder"
        )
    paths = {
        "dir": folder,
        "tokenizer_dir": folder / TOKENIZER_DIR,
        "tokenizer": folder / TOKENIZER_DIR / "tokenizer.json",
        "train": folder / TRAIN_FILE,
        "heldout": folder / HELDOUT_FILE,
        "data_json": folder / DATA_JSON,
    }
    options = read_json(paths["data_json"], "data manifest").get("options")
    return _load_existing(folder, paths, options)
