"""The real corpus: Hugging Face datasets, streamed, one per domain, interleaved by characters."""

from __future__ import annotations

import glob
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crossdiff.data.corpus import Document
from crossdiff.data.tokens import DOMAINS
from crossdiff.plumbing.common import CrossdiffError

SHUFFLE_BUFFER = 1000
ENCODING_ERRORS = ("strict", "replace")
_TEXT_BUILDERS = ("json", "text")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_TEXT_SUFFIXES = (".json", ".jsonl", ".txt", ".text")


@dataclass(frozen=True)
class DomainSource:
    """One dataset for one domain. `path` is a hub id, a local folder, or a builder name such as
    "json"/"parquet" with `data_files`; `name` is the dataset config; `column` holds the text.
    `encoding_errors`: what to do with bytes of local "json"/"text" files that are not UTF-8:
    "strict" (the default) stops with the file and byte offset; "replace" reads them as U+FFFD."""

    domain: str
    path: str
    name: str | None = None
    split: str = "train"
    column: str = "text"
    data_files: str | list[str] | dict[str, Any] | None = None
    data_dir: str | None = None
    encoding_errors: str = "strict"

    def __post_init__(self) -> None:
        if self.encoding_errors not in ENCODING_ERRORS:
            raise CrossdiffError(
                f"encoding_errors={self.encoding_errors!r}; expected one of {ENCODING_ERRORS}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["encoding_errors"] == "strict":  # the default: folders prepared before it existed
            del out["encoding_errors"]  # keep the same options record
        return out

    def describe(self) -> str:
        config = f" ({self.name})" if self.name else ""
        return f"{self.path}{config}[{self.split}].{self.column}"


# The seed paper's mix. Each is overridable (dataclasses.replace or your own DomainSource).
DEFAULT_HF_SOURCES: tuple[DomainSource, ...] = (
    DomainSource("code", "bigcode/starcoderdata", data_dir="python", column="content"),
    DomainSource("science", "togethercomputer/RedPajama-Data-1T", name="arxiv", column="text"),
    DomainSource("stories", "SimpleStories/SimpleStories", column="story"),
)


def _check_sources(
    sources: Sequence[DomainSource],
    proportions: Sequence[float | int] | dict[str, float | int] | None,
) -> list[float]:
    if not sources:
        raise CrossdiffError(
            "no corpus sources were given: expected at least one DomainSource "
            "(or None for the defaults)"
        )
    for source in sources:
        if source.domain not in DOMAINS:
            raise CrossdiffError(
                f"source {source.describe()} has domain {source.domain!r}; "
                f"expected one of {DOMAINS}"
            )
    if proportions is None:
        return [1.0 / len(sources)] * len(sources)
    if isinstance(proportions, dict):
        unknown = sorted(set(proportions) - {s.domain for s in sources})
        if unknown:
            raise CrossdiffError(f"proportions name domains {unknown} that no source provides")
        proportions = [float(proportions.get(s.domain, 0.0)) for s in sources]
    weights = [float(p) for p in proportions]
    if len(weights) != len(sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise CrossdiffError(
            f"proportions {list(proportions)} do not fit {len(sources)} sources: expected one "
            "non-negative weight per source (or a {domain: weight} dict) with a positive sum"
        )
    return [w / sum(weights) for w in weights]


def _open(source: DomainSource, seed: int, shuffle_buffer: int) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise CrossdiffError("the Hugging Face corpus needs `pip install datasets`") from err
    encoding: dict[str, str] = {}
    if source.path in _TEXT_BUILDERS or _text_folder_files(source.path):
        if source.encoding_errors == "strict":
            _check_utf8(source)
        else:
            # "utf_8" is UTF-8 under another spelling: the json builder decodes (with the given
            # errors) only when the encoding is not spelled "utf-8"
            encoding = {"encoding": "utf_8", "encoding_errors": source.encoding_errors}
    try:
        dataset = datasets.load_dataset(
            source.path,
            source.name,
            split=source.split,
            data_files=source.data_files,
            data_dir=source.data_dir,
            streaming=True,
            **encoding,
        )
    except Exception as err:  # network, auth, unknown id or config, missing split, ...
        raise CrossdiffError(
            f"could not open the {source.domain} dataset {source.describe()}: "
            f"{type(err).__name__}: {err}. Check the id, config, split, your network and "
            "Hugging Face login, or pass DomainSource(..., data_files=...) for local files"
        ) from err
    columns = dataset.column_names
    if shuffle_buffer:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
    rows = iter(dataset)
    if columns is None:  # unknown until the first row for some streamed formats
        first = _next_row(source, rows)
        if first is None:
            raise CrossdiffError(f"the {source.domain} dataset {source.describe()} has no rows")
        columns = list(first)
        rows = _chain(first, rows)
    if source.column not in columns:
        raise CrossdiffError(
            f"column {source.column!r} does not exist in the {source.domain} dataset "
            f"{source.path!r}; its columns are {sorted(columns)}; "
            "set DomainSource(column=...) to one of them"
        )
    return rows


def _local_files(data_files: Any) -> list[Path]:
    if data_files is None:
        return []
    if isinstance(data_files, dict):
        return [p for value in data_files.values() for p in _local_files(value)]
    patterns = [data_files] if isinstance(data_files, str | Path) else list(data_files)
    files = []
    for pattern in patterns:
        matches = glob.glob(str(pattern)) or [str(pattern)]
        files += [Path(m) for m in sorted(matches) if Path(m).is_file()]
    return files


def first_invalid_utf8(path: Path, chunk: int = 1 << 20) -> int | None:
    """Byte offset of the first byte of `path` that is not valid UTF-8, or None."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            data = carry + block
            if not data:
                return None
            try:
                data.decode("utf-8")
                offset, carry = offset + len(data), b""
            except UnicodeDecodeError as err:
                if block and err.reason == "unexpected end of data":  # cut inside a character
                    offset, carry = offset + err.start, data[err.start :]
                else:
                    return offset + err.start
            if not block:
                return None


def _text_folder_files(path: str) -> list[Path]:
    """The JSON/text files of a local folder given as a dataset path (empty if it has others)."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    if not files or any(p.suffix not in _TEXT_SUFFIXES for p in files):
        return []
    return files


def _check_utf8(source: DomainSource) -> None:
    files = _local_files(source.data_files) + _text_folder_files(source.path)
    for path in files:
        if path.suffix in _COMPRESSED:
            continue  # checked while streaming (see _interleave)
        offset = first_invalid_utf8(path)
        if offset is not None:
            raise CrossdiffError(
                f"{path} (the {source.domain} corpus) is not valid UTF-8: byte {offset} cannot "
                "be decoded. Fix or re-encode the file, or read such bytes as U+FFFD with "
                "DomainSource(..., encoding_errors='replace') (--hf-source ...,"
                "encoding_errors=replace)"
            )


def _next_row(source: DomainSource, rows: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return next(rows, None)
    except UnicodeDecodeError as err:
        raise CrossdiffError(
            f"the {source.domain} dataset {source.describe()} has bytes that are not UTF-8 "
            f"({err}); fix its files or use DomainSource(..., encoding_errors='replace')"
        ) from err


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest


def hf_corpus(
    sources: Sequence[DomainSource] | None = None,
    proportions: Sequence[float | int] | dict[str, float | int] | None = None,
    max_docs: int | None = None,
    seed: int = 0,
    *,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Iterator[Document]:
    """Stream documents from the sources, interleaved so each source's share of characters
    follows `proportions` (default: equal). Each pick is a seeded draw weighted by how far the
    source is behind its share; an exhausted source drops out and the rest continue.

    Empty texts are skipped; `doc_id`s count from 0 in the order yielded.
    """
    sources = list(DEFAULT_HF_SOURCES if sources is None else sources)
    shares = _check_sources(sources, proportions)
    if max_docs is not None and max_docs < 1:
        raise CrossdiffError(f"max_docs must be at least 1 (or None for no limit), got {max_docs}")
    # opened here, not on first iteration, so a bad source or column fails at the call
    streams = {i: _open(s, seed, shuffle_buffer) for i, s in enumerate(sources) if shares[i] > 0}
    return _interleave(sources, shares, streams, max_docs, random.Random(f"crossdiff-hf-{seed}"))


def _interleave(
    sources: list[DomainSource],
    shares: list[float],
    streams: dict[int, Iterator[dict[str, Any]]],
    max_docs: int | None,
    rng: random.Random,
) -> Iterator[Document]:
    active = sorted(streams)
    chars = [0] * len(sources)
    n_docs = 0
    while active and (max_docs is None or n_docs < max_docs):
        total = sum(chars) + 1
        behind = [max(shares[i] * total - chars[i], 0.0) + 1e-9 for i in active]
        pick = rng.choices(active, weights=behind)[0]
        row = _next_row(sources[pick], streams[pick])
        if row is None:
            active.remove(pick)
            continue
        text = row[sources[pick].column]
        if not isinstance(text, str) or not text.strip():
            continue
        chars[pick] += len(text)
        yield Document(text=text, domain=sources[pick].domain, doc_id=n_docs)
        n_docs += 1
    if n_docs == 0:
        raise CrossdiffError(
            "the Hugging Face corpus is empty: no source gave a non-empty text; "
            f"check {[s.describe() for s in sources]}"
        )
