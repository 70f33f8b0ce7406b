"""The embedded corpus: three labelled domains, deterministic, with cleaned docstrings."""

import pytest

from crossdiff.data import DOMAINS, Document, check_documents, corpus_stats, embedded_corpus
from crossdiff.data.embedded import MAX_DOC_CHARS, clean_docstring, stdlib_files
from crossdiff.data.stories import iter_stories
from crossdiff.plumbing.common import CrossdiffError

BUDGET = 20_000


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return embedded_corpus(n_chars_per_domain=BUDGET, seed=0)


def test_every_domain_meets_its_budget(corpus):
    stats = corpus_stats(corpus)
    for domain in DOMAINS:
        assert BUDGET <= stats[domain]["chars"] < BUDGET + MAX_DOC_CHARS, domain
    assert [d.doc_id for d in corpus] == list(range(len(corpus)))


def test_domains_hold_what_they_say(corpus):
    code = [d.text for d in corpus if d.domain == "code"]
    science = [d.text for d in corpus if d.domain == "science"]
    stories = [d.text for d in corpus if d.domain == "stories"]
    assert all(("def " in t or "import " in t or "class " in t) for t in code)
    assert not any(">>>" in t for t in science)
    assert not any(("def " in t and "):\n" in t) for t in stories)
    assert all(t.split()[0] in ("Once", "There", "In", "Long") for t in stories)


def test_same_seed_same_corpus_other_seed_other_corpus(corpus):
    assert embedded_corpus(n_chars_per_domain=BUDGET, seed=0) == corpus
    other = embedded_corpus(n_chars_per_domain=BUDGET, seed=1)
    for domain in DOMAINS:
        mine = {d.text for d in corpus if d.domain == domain}
        theirs = {d.text for d in other if d.domain == domain}
        assert mine != theirs, domain


def test_code_comes_from_the_stdlib_without_test_suites():
    files = stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "random.py", "decoder.py"} <= names
    assert not any("test" in f.parts for f in files)
    assert list(files) == sorted(files, key=lambda p: p.as_posix())


def test_clean_docstring_drops_doctests_and_examples_but_keeps_prose():
    doc = """Compute the thing.

    The :func:`numpy.mean` of x, see :class:`~torch.Tensor`. Uses ``{'b', 'c', 'a'}``.

    >>> thing(1)
    2
    >>> thing(
    ...     2)
    3

    Parameters
    ----------
    x : float
        The input.

    Examples
    --------
    Plain words in the examples section.
    >>> thing(3)

    Notes
    -----
    A note stays.
    """
    text = clean_docstring(doc)
    assert text.startswith("Compute the thing.")
    assert "The numpy.mean of x, see torch.Tensor. Uses ``{'a', 'b', 'c'}``." in text
    assert "x : float" in text and "A note stays." in text
    for gone in (">>>", "...", "2\n", "Examples", "Plain words", "thing(3)"):
        assert gone not in text, gone


def test_stories_are_seeded_and_varied():
    first = [s for s, _ in zip(iter_stories(3), range(200), strict=False)]
    again = [s for s, _ in zip(iter_stories(3), range(200), strict=False)]
    other = [s for s, _ in zip(iter_stories(4), range(200), strict=False)]
    assert first == again
    assert first != other
    assert len(set(first)) == 200
    assert len({s.split(".")[0] for s in first}) > 50  # many different openings


def test_bad_budget_and_bad_documents_are_errors():
    with pytest.raises(CrossdiffError, match="n_chars_per_domain"):
        embedded_corpus(n_chars_per_domain=0)
    with pytest.raises(CrossdiffError, match="empty"):
        check_documents([])
    with pytest.raises(CrossdiffError, match="unknown domains"):
        check_documents([Document("x", "poetry", 0)])
    with pytest.raises(CrossdiffError, match="doc_id 7"):
        check_documents([Document("a", "code", 7), Document("b", "stories", 7)])
