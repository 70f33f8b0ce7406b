"""The batched spliced-loss evaluation (one clean pass, patched runs from the first paired layer,
kinds stacked, clean/ablated sums cached) gives the numbers of the straightforward loop it
replaced (one full forward per model, scope and kind; kept here as the reference), on trained
micro dense and MoE models, for a single-site, a later-layer and the multi-layer pairing."""

from __future__ import annotations

import pytest
import torch
from test_splice import exact_crosscoder, heldout, markov_rows, models  # noqa: F401

import crossdiff
import crossdiff.crosscoder.spliced_forwards as batched
from crossdiff.activations import load_pairing
from crossdiff.activations.rows import as_token_rows
from crossdiff.crosscoder.spliced_loss import spliced_loss
from crossdiff.crosscoder.splicer import Splicer

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
WIDTHS = {"paper": 16, "mlp-all-layers": 5 * 16}


@torch.no_grad()
def reference(cc, models, tokens, pairing_name, batch_size, per_site=True):  # noqa: F811
    """The evaluation as it was before batching: a means pass, then per batch one clean forward
    and one full forward per model, scope and kind."""
    pairing = load_pairing(pairing_name)
    rows = as_token_rows(tokens, pairing.drop_bos)
    hooks = (pairing.hooks_a, pairing.hooks_b)
    s = Splicer(cc, tuple(models), ("dense", "moe"), hooks, rows.tokens, rows.keep, batch_size,
                False)  # fmt: skip
    sums_m = [torch.zeros(w, dtype=torch.float64) for w in s.widths]
    count = 0
    for tok, keep in s.batches(""):
        count += int(keep.sum())
        for m in range(2):
            x = torch.cat(s.capture(m, tok), dim=-1)
            sums_m[m] += x[keep].double().sum(0)
    means = [list((v / count).split(s.site_widths[m])) for m, v in enumerate(sums_m)]
    sums: dict[tuple, float] = {}
    for tok, keep in s.batches(""):
        clean_loss: list[float] = []
        clean = [s.capture(m, tok, clean_loss) for m in range(2)]
        recon = s.reconstruct(clean)
        for m in range(2):
            h = s.hooks[m]
            values = {"spliced": recon[m], "zero": [torch.zeros(()) for _ in h], "mean": means[m]}
            sums[(m, "all", "clean")] = sums.get((m, "all", "clean"), 0.0) + clean_loss[m]
            scopes = ["all"] + (list(range(len(h))) if per_site and len(h) > 1 else [])
            for scope in scopes:
                sites = range(len(h)) if scope == "all" else [scope]
                for kind, per_hook in values.items():
                    value = s.loss_sum(m, tok, keep, {h[i]: per_hook[i] for i in sites})
                    sums[(m, scope, kind)] = sums.get((m, scope, kind), 0.0) + value
    return s.result(sums, per_site, given_means=False)


def noisy_crosscoder(d: int, scale: float, seed: int) -> crossdiff.CrossCoder:
    """An exact crosscoder with noise on its decoder: spliced CE between clean and ablated."""
    cc = exact_crosscoder(d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cc.W_dec_untied.add_(scale * torch.randn(cc.W_dec_untied.shape, generator=g))
    return cc


def assert_same(got: dict, want: dict, tol: float = 1e-5) -> None:
    for name, w in want["models"].items():
        g = got["models"][name]
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated"):
            assert g[key] == pytest.approx(w[key], abs=tol), (name, key)
        for gs, ws in zip(g["per_site"], w["per_site"], strict=True):
            assert gs["hook"] == ws["hook"]
            assert gs["ce_spliced"] == pytest.approx(ws["ce_spliced"], abs=tol)
            assert gs["ce_mean_ablated"] == pytest.approx(ws["ce_mean_ablated"], abs=tol)
    assert got["notes"] == want["notes"]


@pytest.mark.parametrize("pairing", ["paper", "mlp-all-layers"])
def test_batched_evaluation_matches_the_one_forward_per_kind_loop(models, heldout, pairing):  # noqa: F811
    cc = noisy_crosscoder(WIDTHS[pairing], 0.05, seed=1)
    want = reference(cc, models, heldout, pairing, batch_size=3)
    spliced = want["models"]["dense"]
    # the crosscoder's noise moves the spliced CE off the clean one: the check is not vacuous
    assert spliced["ce_zero_ablated"] > spliced["ce_spliced"] + 0.01 > spliced["ce_clean"] + 0.01
    assert_same(spliced_loss(cc, models, heldout, pairing, batch_size=3), want)


def test_no_kept_activations_and_one_kind_per_forward_give_the_same(models, heldout, monkeypatch):  # noqa: F811
    cc = noisy_crosscoder(16, 0.05, seed=2)
    want = reference(cc, models, heldout, "paper", batch_size=5)
    monkeypatch.setattr(batched, "KEEP_BYTES", 0)  # re-read the clean activations in pass 2
    monkeypatch.setattr(batched, "STACK_BYTES", 1)  # spliced, zero and mean in separate runs
    assert_same(spliced_loss(cc, models, heldout, "paper", batch_size=5), want)


def test_a_rerun_with_another_crosscoder_reads_the_cached_ablations(models, heldout, tmp_path,  # noqa: F811
                                                                    monkeypatch):  # fmt: skip
    calls: list[int] = []
    real = batched.patched_sums

    def counting(*args, **kwargs):
        calls.append(len(args[-1]))  # kinds in this forward
        return real(*args, **kwargs)

    monkeypatch.setattr(batched, "patched_sums", counting)
    first = spliced_loss(
        noisy_crosscoder(80, 0.05, 3), models, heldout, "mlp-all-layers", cache_dir=tmp_path
    )
    assert len(list(tmp_path.glob("splice-*.json"))) == 1 and set(calls) == {3}
    calls.clear()
    other = noisy_crosscoder(80, 0.2, seed=4)  # five sites: per-site scopes cached too
    cached = spliced_loss(other, models, heldout, "mlp-all-layers", cache_dir=tmp_path)
    assert calls and set(calls) == {1}  # only the spliced kind ran
    fresh = spliced_loss(other, models, heldout, "mlp-all-layers")
    assert_same(cached, fresh, tol=1e-9)
    assert cached["models"]["dense"]["ce_spliced"] != first["models"]["dense"]["ce_spliced"]
    # other rows are another key: no stale sums
    calls.clear()
    spliced_loss(other, models, markov_rows(6, seed=5), "mlp-all-layers", cache_dir=tmp_path)
    assert set(calls) == {3} and len(list(tmp_path.glob("splice-*.json"))) == 2
