"""The offline corpus: built at run time from what every crossdiff install already has.

- code: the `.py` sources of the running interpreter's standard library (test suites excluded);
- science: docstrings of installed scientific modules (numpy, scipy, torch, then sympy), with
  doctest examples and cross-reference lists removed;
- stories: procedurally generated simple English stories (crossdiff.data.stories).

Each source is listed in a fixed (sorted) order, shuffled with the seed, and taken until the
character budget of its domain is met, so a seed and an environment give one corpus.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from crossdiff.data.corpus import Document
from crossdiff.data.stories import iter_stories
from crossdiff.plumbing.common import CrossdiffError

DEFAULT_CHARS_PER_DOMAIN = 2_500_000
MAX_DOC_CHARS = 20_000  # long files are cut (at a line end) so one file cannot fill a domain
MIN_DOC_CHARS = 200

SCIENCE_MODULES = (
    "numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.polynomial",
    "scipy.stats", "scipy.special", "scipy.signal", "scipy.optimize", "scipy.linalg",
    "scipy.integrate", "scipy.interpolate", "scipy.ndimage", "scipy.spatial", "scipy.sparse",
    "scipy.sparse.linalg", "scipy.fft", "scipy.cluster.hierarchy", "scipy.cluster.vq",
    "torch", "torch.nn", "torch.nn.functional", "torch.linalg", "torch.distributions",
    "torch.fft", "torch.special", "torch.optim", "sympy",
)  # fmt: skip
_SKIPPED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}


def _cut(text: str, limit: int = MAX_DOC_CHARS) -> str:
    if len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)
    return text[: end if end > 0 else limit]


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's .py files, sorted by path relative to the stdlib folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if not _SKIPPED_STDLIB_PARTS.intersection(path.relative_to(root).parts)
    ]
    return tuple(sorted(files, key=lambda path: path.relative_to(root).as_posix()))


def code_texts(n_chars: int, seed: int) -> Iterator[str]:
    files = list(stdlib_files())
    random.Random(f"crossdiff-code-{seed}").shuffle(files)
    total = 0
    for path in files:
        if total >= n_chars:
            return
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = _cut(text.strip())
        if len(text) >= MIN_DOC_CHARS:
            total += len(text)
            yield text


_SECTION = re.compile(r"^(\w[\w ]*)\n(-{3,}|={3,})$", re.MULTILINE)
_DROPPED_SECTIONS = {"examples", "example", "see also"}
# SciPy appends the same backend-support table to hundreds of docstrings.
_BOILERPLATE = re.compile(r"\*\*Array API Standard Support\*\*.*", re.DOTALL)
# a set printed into a docstring comes out in hash order; sort it so runs agree
_STRING_SET = re.compile(r"\{('[^']*'(?:, '[^']*')+)\}")
_ROLE = re.compile(r":[\w:]+:`~?([^`<]+?)(?:\s*<[^>]+>)?`")


def clean_docstring(doc: str) -> str:
    """Keep a docstring's prose and maths; drop doctest sessions, example and see-also sections."""
    doc = inspect.cleandoc(doc)
    # numpy-style sections: a title underlined with dashes; drop whole "Examples"/"See Also".
    pieces = _SECTION.split(doc)
    kept = [_BOILERPLATE.sub("", pieces[0])]
    for title, rule, body in zip(pieces[1::3], pieces[2::3], pieces[3::3], strict=True):
        if title.strip().lower() not in _DROPPED_SECTIONS:
            kept.append(f"{title}\n{rule}{_BOILERPLATE.sub('', body)}")
    lines, in_doctest = [], False
    for line in "\n".join(kept).splitlines():
        stripped = line.strip()
        if stripped.startswith((">>>", "... ")) or stripped == "...":
            in_doctest = True
            continue
        if in_doctest and stripped:  # the doctest's printed output
            continue
        in_doctest = False
        if stripped.lower().rstrip(":") in ("example", "examples"):
            continue
        lines.append(line)
    text = _ROLE.sub(r"\1", "\n".join(lines))
    text = _STRING_SET.sub(lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _public_docstrings(module_name: str, seen: dict[int, object]) -> Iterator[str]:
    """`seen` maps id -> object and keeps the objects alive, so an id is never reused."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # an optional module that is absent or broken here is simply skipped
        return
    for name in sorted(n for n in dir(module) if not n.startswith("_")):
        try:
            obj = getattr(module, name)
        except Exception:
            continue
        if inspect.ismodule(obj) or id(obj) in seen:
            continue
        seen[id(obj)] = obj
        if isinstance(getattr(obj, "__doc__", None), str):
            yield obj.__doc__
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                doc = getattr(member, "__doc__", None)
                if attr.startswith("_") or id(member) in seen or not isinstance(doc, str):
                    continue
                seen[id(member)] = member
                if doc != getattr(type(member), "__doc__", None):
                    yield doc


@functools.cache
def science_docstrings(modules: tuple[str, ...] = SCIENCE_MODULES) -> tuple[str, ...]:
    """Every distinct cleaned docstring of the modules' public objects, in a fixed order.

    Cached: the walk imports scipy and sympy and takes seconds.
    """
    seen_objects: dict[int, object] = {}
    seen_texts: set[str] = set()
    texts = []
    with warnings.catch_warnings():  # deprecated aliases warn when touched
        warnings.simplefilter("ignore")
        for module_name in tqdm(modules, desc="science docstrings", unit="module", leave=False):
            for doc in _public_docstrings(module_name, seen_objects):
                text = _cut(clean_docstring(doc))
                if len(text) >= MIN_DOC_CHARS and text not in seen_texts:
                    seen_texts.add(text)
                    texts.append(text)
    return tuple(texts)


def science_texts(n_chars: int, seed: int) -> Iterator[str]:
    texts = list(science_docstrings())
    random.Random(f"crossdiff-science-{seed}").shuffle(texts)
    total = 0
    for text in texts:
        if total >= n_chars:
            return
        total += len(text)
        yield text


def story_texts(n_chars: int, seed: int) -> Iterator[str]:
    total = 0
    for story in iter_stories(seed):
        if total >= n_chars:
            return
        total += len(story)
        yield story


def embedded_corpus(
    n_chars_per_domain: int = DEFAULT_CHARS_PER_DOMAIN, seed: int = 0
) -> list[Document]:
    """About `n_chars_per_domain` characters of code, science and stories, labelled by domain.

    A domain whose source runs out before the budget keeps what there is (never repeated text);
    the caller sees the real sizes in `corpus_stats(docs)`.
    """
    if n_chars_per_domain <= 0:
        raise CrossdiffError(
            f"n_chars_per_domain must be positive, got {n_chars_per_domain}; "
            f"the tiny default is {DEFAULT_CHARS_PER_DOMAIN:,}"
        )
    sources = {"code": code_texts, "science": science_texts, "stories": story_texts}
    docs: list[Document] = []
    for domain, texts in sources.items():
        for text in texts(n_chars_per_domain, seed):
            docs.append(Document(text=text, domain=domain, doc_id=len(docs)))
        if not any(doc.domain == domain for doc in docs):
            raise CrossdiffError(
                f"the embedded corpus found no {domain} text in this Python installation; "
                "use the Hugging Face corpus instead (source='hf')"
            )
    return docs
