"""Top contexts: the right tokens, in order, with windows that never cross a document boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_analysis_planted import DOC_LEN, planted

from crossdiff.analysis import diff_features, top_contexts
from crossdiff.plumbing.common import CrossdiffError

pytestmark = pytest.mark.usefixtures("one_thread")


class StubTokenizer:
    name = "stub"

    def decode(self, ids: list[int]) -> str:
        return f"[{ids[0]}]"


@pytest.fixture(scope="module")
def setup():
    p = planted(n_tokens=3000)
    diff = diff_features(
        p.cc, p.acts, metadata=p.metadata, tokenizer=StubTokenizer(), n_top_contexts=6,
        context_window=3, show_progress=False, batch_size=700,
    )  # fmt: skip
    with torch.no_grad():
        f = p.cc.encode(p.acts)
    return p, diff, f


def test_top_tokens_are_the_true_top_activations(setup):
    p, diff, f = setup
    for j in range(f.shape[1]):
        col = f[:, j].numpy()
        n_fire = int((col > 0).sum())
        want = np.sort(col)[::-1][: min(6, n_fire)]
        got = diff.top_values[j, : len(want)]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert (diff.top_indices[j, len(want) :] == -1).all()
        idx = diff.top_indices[j, : len(want)]
        np.testing.assert_allclose(col[idx], want, rtol=1e-6)


def test_panel_contexts_are_ordered_windows_within_one_document(setup):
    p, diff, f = setup
    assert diff.details, "some latents must get panels"
    doc_ids, positions = p.metadata["doc_ids"], p.metadata["positions"]
    for j, detail in diff.details.items():
        contexts = detail["contexts"]
        assert contexts and len(contexts) <= 6
        acts = [c["activation"] for c in contexts]
        assert acts == sorted(acts, reverse=True) and acts[0] > 0
        for c in contexts:
            t = c["token_index"]
            start = t - c["center"]
            window = range(start, start + len(c["tokens"]))
            assert len(c["tokens"]) <= 7
            assert {int(doc_ids[i]) for i in window} == {int(doc_ids[t])}
            assert c["activations"][c["center"]] == pytest.approx(float(f[t, j]), rel=1e-5)
            np.testing.assert_allclose(c["activations"], f[list(window), j].numpy(), rtol=1e-5)
            ids = p.metadata["token_ids"][list(window)].tolist()
            assert c["token_ids"] == ids
            assert c["text"] == "".join(f"[{i}]" for i in ids)
            pos = int(positions[t])
            # truncated exactly at a document edge, never elsewhere
            assert c["center"] == min(3, pos)
            assert len(c["tokens"]) - c["center"] - 1 == min(3, DOC_LEN - 1 - pos, 3000 - 1 - t)
            assert c["domain"] == ("code", "science", "stories")[int(p.metadata["domains"][t])]


def test_top_contexts_alone_matches_the_diff(setup):
    p, diff, _ = setup
    latent = next(iter(diff.details))
    from_diff = top_contexts(diff, latent, n_contexts=4, window=3)
    standalone = top_contexts(
        p.acts, latent, cc=p.cc, metadata=p.metadata, tokenizer=StubTokenizer(), n_contexts=4,
        window=3, batch_size=500,
    )  # fmt: skip
    assert [c["token_index"] for c in standalone] == [c["token_index"] for c in from_diff]
    assert standalone == from_diff
    assert diff.details[latent]["contexts"][:4] == from_diff


def test_top_contexts_errors(setup):
    p, diff, _ = setup
    with pytest.raises(CrossdiffError, match="out of range"):
        top_contexts(diff, 10_000)
    with pytest.raises(CrossdiffError, match="n_top_contexts=50"):
        top_contexts(diff, 0, n_contexts=50)
    with pytest.raises(CrossdiffError, match="needs the crosscoder"):
        top_contexts(p.acts, 0)


def test_dead_latent_has_no_contexts(setup):
    p, diff, _ = setup
    dead = int(diff.latents("dead")["latent"].iloc[0])
    assert top_contexts(diff, dead) == []
