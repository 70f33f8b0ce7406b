"""The Hugging Face path, run offline on datasets the test writes to local disk."""

import json
from collections import Counter
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossdiff.data import DomainSource, hf_corpus
from crossdiff.plumbing.common import CrossdiffError

N_ROWS = 60


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """code as JSON lines (column content), science as parquet (text), stories as a folder."""
    root = tmp_path_factory.mktemp("hf")
    code = root / "code.jsonl"
    code.write_text(
        "".join(json.dumps({"content": f"code-{i} " + "x" * 90, "lang": "py"}) + "\n"
                for i in range(N_ROWS))
    )  # fmt: skip
    science = root / "science.parquet"
    table = pa.table({"text": [f"science-{i} " + "y" * 90 for i in range(N_ROWS)]})
    pq.write_table(table, science)
    stories = root / "stories"
    stories.mkdir()
    (stories / "train.jsonl").write_text(
        "".join(json.dumps({"story": f"stories-{i} " + "z" * 90}) + "\n" for i in range(N_ROWS))
    )
    return [
        DomainSource("code", "json", data_files=str(code), column="content"),
        DomainSource("science", "parquet", data_files=str(science), column="text"),
        DomainSource("stories", str(stories), column="story"),
    ]


def test_every_row_arrives_once_with_its_domain(sources):
    docs = list(hf_corpus(sources, seed=0, shuffle_buffer=0))
    assert len(docs) == 3 * N_ROWS
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    for doc in docs:
        assert doc.text.startswith(doc.domain + "-")
    texts = Counter(d.text.split()[0] for d in docs)
    assert len(texts) == 3 * N_ROWS  # no repeats


def test_proportions_set_the_character_shares(sources):
    docs = list(hf_corpus(sources, proportions=[2, 1, 1], max_docs=80, seed=0, shuffle_buffer=0))
    counts = Counter(d.domain for d in docs)
    assert 36 <= counts["code"] <= 44  # half of 80 (equal-length rows)
    assert 16 <= counts["science"] <= 24 and 16 <= counts["stories"] <= 24
    by_name = list(hf_corpus(sources, {"stories": 1.0}, max_docs=10, seed=0, shuffle_buffer=0))
    assert {d.domain for d in by_name} == {"stories"}


def _texts(sources, seed, shuffle_buffer=0, n=50):
    return [d.text for d in islice(hf_corpus(sources, seed=seed, shuffle_buffer=shuffle_buffer), n)]


def test_interleaving_is_seeded(sources):
    # (datasets sleeps seconds after a shuffled parquet stream, so the shuffle is tested on json)
    first = _texts(sources, 0)
    assert first == _texts(sources, 0) and first != _texts(sources, 1)
    domains = [t.split("-")[0] for t in first]
    assert sum(a != b for a, b in zip(domains, domains[1:], strict=False)) > 10
    code_only = [sources[0]]
    assert _texts(code_only, 0, shuffle_buffer=0, n=N_ROWS)[:3] == [
        f"code-{i} " + "x" * 90 for i in range(3)
    ]
    shuffled = _texts(code_only, 0, shuffle_buffer=100, n=N_ROWS)
    assert shuffled == _texts(code_only, 0, shuffle_buffer=100, n=N_ROWS)
    assert shuffled != _texts(code_only, 0, shuffle_buffer=0, n=N_ROWS)
    assert sorted(shuffled) == sorted(_texts(code_only, 0, shuffle_buffer=0, n=N_ROWS))


def test_a_missing_column_names_the_columns_there_are(sources):
    bad = DomainSource("code", "json", data_files=sources[0].data_files, column="text")
    with pytest.raises(CrossdiffError) as err:
        hf_corpus([bad, sources[1]])
    message = str(err.value)
    assert "'text'" in message and "json" in message and "['content', 'lang']" in message


def test_empty_and_wrong_sources_are_clear_errors(sources, tmp_path):
    with pytest.raises(CrossdiffError, match="no corpus sources"):
        hf_corpus([])
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"story": "   "}) + "\n")
    with pytest.raises(CrossdiffError, match="corpus is empty"):
        list(hf_corpus([DomainSource("stories", "json", data_files=str(blank), column="story")]))
    with pytest.raises(CrossdiffError, match="could not open"):
        hf_corpus([DomainSource("code", "json", data_files=str(tmp_path / "none.jsonl"))])
    with pytest.raises(CrossdiffError, match="expected one of"):
        hf_corpus([DomainSource("poetry", "json", data_files=sources[0].data_files)])
    with pytest.raises(CrossdiffError, match="proportions"):
        hf_corpus(sources, proportions=[1, 1])
