"""prepare_data: the folder it writes, resume, option mismatches, and the CLI subcommand."""

import argparse
import json

import pytest
import torch

import crossdiff.data.prepare as prepare_module
from crossdiff.data import DOMAINS, DomainSource, TokenSet, load_tokenizer, prepare_data
from crossdiff.data.commands import parse_source, register
from crossdiff.plumbing.common import CrossdiffError

SMALL = {"n_chars_per_domain": 30_000, "vocab_size": 400, "seq_len": 32}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return prepare_data(out, **SMALL)


def test_writes_the_documented_layout(prepared):
    out = prepared.paths["dir"]
    for name in ("tokenizer/tokenizer.json", "tokens_train.safetensors",
                 "tokens_heldout.safetensors", "data.json"):  # fmt: skip
        assert (out / name).exists(), name
    manifest = json.loads((out / "data.json").read_text())
    assert manifest["options"]["source"] == "embedded" and manifest["options"]["seq_len"] == 32
    assert manifest["stats"]["tokenizer"]["fingerprint"] == prepared.tokenizer.fingerprint
    for domain in DOMAINS:
        assert manifest["stats"]["corpus"][domain]["chars"] >= 30_000
        assert manifest["stats"]["train"][domain]["rows"] > 0
        assert manifest["stats"]["heldout"][domain]["rows"] > 0
    assert manifest["stats"]["train_rows"] == len(prepared.train)
    train = TokenSet.load(out / "tokens_train.safetensors")
    assert torch.equal(train.tokens, prepared.train.tokens)
    assert load_tokenizer(out / "tokenizer").fingerprint == prepared.tokenizer.fingerprint
    assert prepared.tokenizer.vocab_size == 400
    assert int(prepared.train.tokens.max()) < 400
    train_docs = set(prepared.train.doc_ids.flatten().tolist())
    assert train_docs.isdisjoint(prepared.heldout.doc_ids.flatten().tolist())


def test_second_call_loads_instead_of_rebuilding(prepared, monkeypatch, capsys):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("prepare_data rebuilt the corpus although the folder was complete")

    monkeypatch.setattr(prepare_module, "embedded_corpus", no_rebuild)
    again = prepare_data(prepared.paths["dir"], **SMALL)
    assert "loaded prepared data" in capsys.readouterr().out
    assert torch.equal(again.train.tokens, prepared.train.tokens)
    assert torch.equal(again.heldout.doc_positions, prepared.heldout.doc_positions)
    assert again.tokenizer.fingerprint == prepared.tokenizer.fingerprint


def test_other_options_on_the_same_folder_are_an_error(prepared):
    with pytest.raises(CrossdiffError, match=r"seq_len: 32 there vs 64 now"):
        prepare_data(prepared.paths["dir"], **(SMALL | {"seq_len": 64}))
    with pytest.raises(CrossdiffError, match="seed"):
        prepare_data(prepared.paths["dir"], **SMALL, seed=3)


def test_a_given_tokenizer_is_used_as_is(prepared, tmp_path):
    result = prepare_data(
        tmp_path, n_chars_per_domain=30_000, seq_len=32, tokenizer=prepared.paths["tokenizer_dir"]
    )
    assert result.tokenizer.fingerprint == prepared.tokenizer.fingerprint
    assert torch.equal(result.train.tokens, prepared.train.tokens)  # same corpus, same ids


def test_hf_source_on_local_files(tmp_path):
    sources = []
    for domain in DOMAINS:
        path = tmp_path / f"{domain}.jsonl"
        rows = [{"body": f"{domain} document {i}: " + "lorem ipsum dolor " * 8} for i in range(40)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sources.append(DomainSource(domain, "json", data_files=str(path), column="body"))
    result = prepare_data(
        tmp_path / "out", source="hf", hf_sources=sources, n_chars_per_domain=3_000,
        vocab_size=300, seq_len=16,
    )  # fmt: skip
    counts = result.stats["corpus"]
    for domain in DOMAINS:
        assert 2_000 <= counts[domain]["chars"] <= 6_000, counts
    manifest = json.loads(result.paths["data_json"].read_text())
    assert manifest["options"]["hf_sources"][0]["column"] == "body"
    assert set(result.train.domains.tolist()) == {0, 1, 2}


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(CrossdiffError, match="unknown data preset 'huge'"):
        prepare_data(tmp_path, preset="huge")
    with pytest.raises(CrossdiffError, match="either a tokenizer"):
        prepare_data(tmp_path, vocab_size=300, tokenizer="gpt2")
    with pytest.raises(CrossdiffError, match="source must be"):
        prepare_data(tmp_path, source="web")
    with pytest.raises(CrossdiffError, match="source='hf' only"):
        prepare_data(tmp_path, hf_sources=[DomainSource("code", "json")])
    assert not (tmp_path / "data.json").exists()


def test_cli_subcommand_parses_and_runs(prepared, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["prepare-data", str(prepared.paths["dir"]), "--n-chars-per-domain", "30000",
         "--vocab-size", "400", "--seq-len", "32"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert "data ready in" in capsys.readouterr().out
    source = parse_source("domain=stories,path=SimpleStories/SimpleStories,column=story")
    assert source == DomainSource("stories", "SimpleStories/SimpleStories", column="story")
    with pytest.raises(CrossdiffError, match="key=value"):
        parse_source("stories:SimpleStories")
