"""The byte-level BPE: round trips, BOS, save/load, fingerprints, errors."""

import json

import pytest

from crossdiff.data import Document, load_tokenizer, train_tokenizer
from crossdiff.data.stories import iter_stories
from crossdiff.plumbing.common import CrossdiffError

TEXTS = [s for s, _ in zip(iter_stories(0), range(300), strict=False)] + [
    "def area(radius):\n    return 3.14159 * radius ** 2\n" * 3,
    "The variance of a Gaussian is sigma squared; its entropy grows with log(sigma).",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([Document(t, "stories", i) for i, t in enumerate(TEXTS)], 400)


def test_round_trip_without_bos(tokenizer):
    text = 'Once upon a time, Zoë said "naïve café ✅"\n\tdef f(x): return x**2  # ok'
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode([tokenizer.bos_token_id]) == "<|bos|>"


def test_sizes_and_merges_learned(tokenizer):
    assert tokenizer.vocab_size == 400
    assert tokenizer.name == "crossdiff-bpe-400"
    story = TEXTS[0]
    assert len(tokenizer.encode(story)) < 0.7 * len(story.encode())  # 143 merges compress it


def test_save_and_load_keep_ids_and_fingerprint(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    for where in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(where)
        assert loaded.fingerprint == tokenizer.fingerprint
        assert loaded.bos_token_id == tokenizer.bos_token_id
        assert loaded.name == tokenizer.name
        assert loaded.encode(TEXTS[5]) == tokenizer.encode(TEXTS[5])


def test_fingerprint_is_deterministic_and_tells_tokenizers_apart(tokenizer):
    again = train_tokenizer(TEXTS, 400)
    assert again.fingerprint == tokenizer.fingerprint
    assert train_tokenizer(TEXTS, 380).fingerprint != tokenizer.fingerprint
    assert train_tokenizer(TEXTS[:100], 400).fingerprint != tokenizer.fingerprint


def test_bare_tokenizer_json_uses_its_special_token(tokenizer, tmp_path):
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))  # no crossdiff metadata beside it
    loaded = load_tokenizer(tmp_path)
    assert loaded.bos_token == "<|bos|>" and loaded.bos_token_id == tokenizer.bos_token_id


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(CrossdiffError, match="vocab_size 100 is too small"):
        train_tokenizer(TEXTS, 100)
    with pytest.raises(CrossdiffError, match="empty corpus"):
        train_tokenizer([], 400)
    with pytest.raises(CrossdiffError, match="without a tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(CrossdiffError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "bad")
    # offline (tests set HF_HUB_OFFLINE): a hub name that is not cached cannot load
    with pytest.raises(CrossdiffError, match="could not load the Hugging Face tokenizer"):
        load_tokenizer("no-such-user/no-such-tokenizer")
