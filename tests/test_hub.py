"""`crossdiff.push_to_hub` and `crossdiff.load_crosscoder("hf://...")` against a local mock of the
Hub (no network): HfApi.create_repo/upload_folder and snapshot_download read and write a folder
per repository. The round trip keeps training.json, the checksum and the report, and the loaded
crosscoder is the one pushed; a damaged download is refused by the checksum."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

import crossdiff
from crossdiff.crosscoder.hub import parse_hf_url
from crossdiff.plumbing.common import CrossdiffError


class MockHub:
    """A hub whose repositories are folders under `root`; records the calls made."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []
        hub = self

        class Api:
            def __init__(self, token=None):
                hub.calls.append(("HfApi", token))

            def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
                hub.calls.append(("create_repo", repo_id, repo_type, exist_ok))
                (hub.root / repo_id).mkdir(parents=True, exist_ok=True)

            def upload_folder(self, *, folder_path, repo_id, path_in_repo="", **kwargs):
                hub.calls.append(("upload_folder", repo_id, path_in_repo))
                target = hub.root / repo_id / path_in_repo
                shutil.copytree(folder_path, target, dirs_exist_ok=True)

        self.Api = Api

    def snapshot_download(self, repo_id, repo_type=None, revision=None, allow_patterns=None,
                          token=None):  # fmt: skip
        self.calls.append(("snapshot_download", repo_id, revision, allow_patterns))
        repo = self.root / repo_id
        if not repo.is_dir():
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 {repo_id}")
        out = self.root.parent / "cache" / repo_id.replace("/", "--")
        for path in repo.rglob("*"):
            rel = path.relative_to(repo).as_posix()
            if path.is_file() and (
                allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)
            ):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out / rel)
        return str(out)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> MockHub:
    mock = MockHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", mock.Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", mock.snapshot_download)
    return mock


def saved_crosscoder(folder: Path) -> crossdiff.CrossCoder:
    torch.manual_seed(0)
    cc = crossdiff.CrossCoder(crossdiff.CrossCoderConfig(d_model=8, d_sae=16, k=2))
    with torch.no_grad():
        cc.W_enc.normal_()
    cc.save(folder)
    (folder / "training.json").write_text(json.dumps({"fve": 0.87}))
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.safetensors").write_bytes(b"big")
    return cc


def test_push_and_load_round_trip_keeps_training_checksum_and_report(hub, tmp_path):
    cc = saved_crosscoder(tmp_path / "cc")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    address = crossdiff.push_to_hub(tmp_path / "cc", "me/diff", subfolder="run1", report=report)
    assert address == "hf://me/diff/run1"
    repo = hub.root / "me" / "diff" / "run1"
    assert {p.name for p in repo.iterdir()} == {
        "cfg.json", "sae_weights.safetensors", "sae_weights.safetensors.sha256",
        "training.json", "report", "README.md",
    }  # fmt: skip
    assert (repo / "report" / "report.json").exists()
    card = (repo / "README.md").read_text()
    assert 'crossdiff.load_crosscoder("hf://me/diff/run1")' in card and "import crossdiff" in card

    loaded = crossdiff.load_crosscoder("hf://me/diff/run1@main")
    assert ("snapshot_download", "me/diff", "main", ["run1/*", "run1/**"]) in hub.calls
    torch.testing.assert_close(loaded.W_enc, cc.W_enc, atol=0, rtol=0)
    # the checksum came along: a damaged weights file on the hub is refused, not loaded unverified
    weights = repo / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CrossdiffError, match="(?i)checksum|sha256"):
        crossdiff.load_crosscoder("hf://me/diff/run1")


def test_hub_addresses_and_errors(hub, tmp_path):
    assert parse_hf_url("hf://a/b") == ("a/b", None, None)
    assert parse_hf_url("hf://a/b/c/d@v1") == ("a/b", "c/d", "v1")
    with pytest.raises(CrossdiffError, match="not a hub address"):
        parse_hf_url("hf://just-a-name")
    with pytest.raises(CrossdiffError, match="could not download hf://no/such"):
        crossdiff.load_crosscoder("hf://no/such")
    with pytest.raises(CrossdiffError, match="has no sae_weights.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "cfg.json").write_text("{}")
        crossdiff.push_to_hub(tmp_path / "empty", "me/x")
