"""Planted data with known classes, densities, domains and experts, a stand-in crosscoder that
decodes it exactly, and the tests that diff_features recovers the truth. Other analysis/report tests
import `planted` and `PlantedCrossCoder` from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from jaxtyping import Float
from torch import Tensor, nn

from crossdiff.analysis import diff_features
from crossdiff.analysis.claims import evaluate_claims
from crossdiff.plumbing.common import CrossdiffError

pytestmark = pytest.mark.usefixtures("one_thread")

N_EXPERTS, TOP_K, DOC_LEN = 8, 2, 40
# group -> (number of latents, density range, decoder scale in dense, decoder scale in moe)
GROUPS = {
    "designated-shared": (4, (0.03, 0.07), 1.0, 1.0),
    "shared": (12, (0.03, 0.07), 1.0, 1.0),
    "dense-only": (8, (0.004, 0.012), 1.0, 0.05),
    "moe-only": (8, (0.15, 0.25), 0.05, 1.0),
    "artifact": (1, (0.1, 0.1), 0.05, 1.0),  # moe-only by weights, but present in dense's data
    "dead": (4, (0.0, 0.0), 1.0, 1.0),
}
CODE_ONLY = 5  # a shared latent that fires only on code tokens
EXPERT_TIED = 17  # a shared latent that fires only when expert 3 is routed


@dataclass
class Planted:
    acts: Tensor
    metadata: dict[str, Tensor]
    cc: nn.Module
    truth: dict[str, list[int]]
    density: np.ndarray
    extra: dict = field(default_factory=dict)


class PlantedCrossCoder(nn.Module):
    """A crosscoder that encodes planted data exactly: the planted decoder, its pseudo-inverse as
    encoder, a JumpReLU-style threshold. Same protocol as crossdiff.crosscoder.CrossCoder."""

    def __init__(self, w_dec: Tensor, b_dec: Tensor, n_shared: int, threshold: float = 0.5):
        super().__init__()
        d_sae, n_models, d_model = w_dec.shape
        self.cfg = SimpleNamespace(
            n_models=n_models, d_sae=d_sae, d_model=d_model, n_shared=n_shared,
            shared_decoder="free",
        )  # fmt: skip
        self.W_dec = nn.Parameter(w_dec.clone())
        self.b_dec = nn.Parameter(b_dec.clone())
        self.threshold = torch.tensor(threshold)

    def decoder_norms(self) -> Float[Tensor, "d_sae n_models"]:
        return self.W_dec.norm(dim=-1)

    def encode(self, x: Float[Tensor, "batch n_models d_model"]) -> Float[Tensor, "batch d_sae"]:
        sq = (self.W_dec**2).sum(dim=(1, 2)).clamp_min(1e-12)
        pre = torch.einsum("bmd,smd->bs", x - self.b_dec, self.W_dec) / sq
        return pre * (pre > self.threshold)

    def decode(self, f: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch n_models d_model"]:
        return torch.einsum("bs,smd->bmd", f, self.W_dec) + self.b_dec


def planted(n_tokens: int = 6000, d_model: int = 48, seed: int = 0, noise: float = 0.01) -> Planted:
    g = torch.Generator().manual_seed(seed)
    truth: dict[str, list[int]] = {}
    dens, scale_a, scale_b, data_a = [], [], [], []
    for name, (count, (lo, hi), sa, sb) in GROUPS.items():
        truth[name] = list(range(len(dens), len(dens) + count))
        dens += torch.empty(count).uniform_(lo, hi, generator=g).tolist()
        scale_a += [sa] * count
        scale_b += [sb] * count
        data_a += [1.0 if name == "artifact" else sa] * count
    d_sae = len(dens)
    basis_a = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))[0][:, :d_sae].T
    basis_b = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))[0][:, :d_sae].T
    w_dec = torch.stack(
        [basis_a * torch.tensor(scale_a)[:, None], basis_b * torch.tensor(scale_b)[:, None]], 1
    )
    b_dec = torch.randn(2, d_model, generator=g) * 0.5

    n_docs = -(-n_tokens // DOC_LEN)
    doc_ids = torch.arange(n_tokens) // DOC_LEN
    positions = torch.arange(n_tokens) % DOC_LEN
    domains = (torch.arange(n_docs) % 3)[doc_ids]
    experts = torch.stack([torch.randperm(N_EXPERTS, generator=g)[:TOP_K] for _ in range(n_tokens)])
    fires = torch.rand(n_tokens, d_sae, generator=g) < torch.tensor(dens)
    fires[:, CODE_ONLY] &= domains == 0
    fires[:, EXPERT_TIED] &= (experts == 3).any(-1)
    mags = torch.empty(n_tokens, d_sae).uniform_(1.0, 3.0, generator=g)
    f = fires * mags
    acts_a = f @ (basis_a * torch.tensor(data_a)[:, None])
    acts_b = f @ w_dec[:, 1]
    acts = torch.stack([acts_a, acts_b], 1) + b_dec
    acts = acts + noise * torch.randn(acts.shape, generator=g)
    metadata = {
        "token_ids": torch.randint(0, 100, (n_tokens,), generator=g),
        "doc_ids": doc_ids,
        "positions": positions,
        "domains": domains,
        "experts": experts,
    }
    cc = PlantedCrossCoder(w_dec, b_dec, n_shared=len(truth["designated-shared"]))
    return Planted(acts, metadata, cc, truth, fires.float().mean(0).numpy(), {"f": f})


@pytest.fixture(scope="module")
def data() -> Planted:
    return planted()


@pytest.fixture(scope="module")
def diff(data):
    # the expert-tied latent fires only 12 times: below the default minimum for attribution
    return diff_features(
        data.cc, data.acts, metadata=data.metadata, batch_size=1000, show_progress=False,
        min_expert_firings=10,
    )  # fmt: skip


def test_class_counts_match_planted_truth(data, diff):
    counts = diff.summary["class_counts"]
    t = data.truth
    # free decoders: the designated latents are classed by relative norm (balanced: shared)
    assert counts["designated-shared"] == 0
    assert counts["shared"] == len(t["shared"]) + len(t["designated-shared"])
    assert counts["dense-only"] == len(t["dense-only"])
    assert counts["moe-only"] == len(t["moe-only"]) + len(t["artifact"])
    assert counts["dead"] == len(t["dead"])
    labels = diff.table["class"].to_numpy()
    for group in ("shared", "dense-only", "moe-only", "dead"):
        assert set(labels[t[group]]) == {group}
    assert set(labels[t["designated-shared"]]) == {"shared"}
    assert diff.summary["designated"] == {
        "n": 4,
        "shared_decoder": "free",
        "shared": 4,
        "dense-only": 0,
        "moe-only": 0,
        "dead": 0,
    }


def relaxed_claims(diff, min_n: int) -> list[dict]:
    """The diff's claims re-evaluated with another minimum n per class."""
    t = diff.table
    claims, _ = evaluate_claims(
        t["density"].to_numpy(), t["class"].to_numpy(), "dense", "moe", None, min_n=min_n
    )
    return claims


def test_density_matches_truth_and_orders_classes(data, diff):
    np.testing.assert_allclose(diff.table["density"].to_numpy(), data.density, atol=1e-12)
    d = diff.summary["density"]
    assert d["moe-only"]["median"] > d["shared"]["median"] > d["dense-only"]["median"]
    # 8 dense-only and 9 moe-only latents: below the minimum n of 10, so no claim is tested, but
    # the effect is still reported (every moe-only density is above every shared one)
    claims = {c["key"]: c for c in diff.summary["claims"]}
    assert claims["b_denser_than_shared"]["verdict"] == "too few latents to test"
    assert claims["b_denser_than_shared"]["effect"] == 1.0
    assert claims["a_sparser_than_shared"]["effect"] == -1.0
    assert claims["a_sparser_than_shared"]["p_value"] is None
    assert "holds" not in claims["a_sparser_than_shared"]["sentence"]
    # with a minimum of 5 per class the same densities do test, and both claims hold
    relaxed = {c["key"]: c for c in relaxed_claims(diff, min_n=5)}
    assert relaxed["b_denser_than_shared"]["verdict"] == "holds"
    assert relaxed["b_denser_than_shared"]["p_holm"] < 1e-3
    assert relaxed["a_sparser_than_shared"]["verdict"] == "holds"
    assert "holds (n = 8 dense-only vs 16 shared" in relaxed["a_sparser_than_shared"]["sentence"]


def test_density_claim_reported_false_when_planted_reversed():
    p = planted(seed=1)
    # swap which model each specific group lives in: now the sparse group is moe-only
    w = p.cc.W_dec.detach().flip(1)
    cc = PlantedCrossCoder(w, p.cc.b_dec.detach().flip(0), n_shared=4)
    diff = diff_features(
        cc, p.acts.flip(1), metadata=p.metadata, show_progress=False, batch_size=2000
    )
    claims = {c["key"]: c for c in relaxed_claims(diff, min_n=5)}
    assert claims["b_denser_than_shared"]["verdict"] == "does not hold"
    assert claims["a_sparser_than_shared"]["verdict"] == "does not hold"
    assert claims["b_denser_than_shared"]["effect"] < 0 < claims["a_sparser_than_shared"]["effect"]
    assert "does not hold" in claims["b_denser_than_shared"]["sentence"]


def test_mean_activation_relative_norm_and_fve(data, diff):
    f = data.extra["f"]
    fired = (f > 0).sum(0)
    expected = np.where(fired > 0, (f.sum(0) / fired.clamp_min(1)).numpy(), np.nan)
    live = fired.numpy() > 0
    # the artifact latent is encoded 5% high by construction (its dense data is 20x its decoder)
    ok = live.copy()
    ok[data.truth["artifact"]] = False
    np.testing.assert_allclose(
        diff.table["mean_activation"].to_numpy()[ok], expected[ok], rtol=1e-3
    )
    r = diff.table["relative_norm"].to_numpy()
    np.testing.assert_allclose(r[data.truth["moe-only"]], 1 / 1.05, rtol=1e-5)
    np.testing.assert_allclose(r[data.truth["dense-only"]], 0.05 / 1.05, rtol=1e-5)
    # FVE against a direct whole-set computation
    x = data.acts.double()
    with torch.no_grad():
        x_hat = data.cc.decode(data.cc.encode(data.acts)).double()
    for m, name in enumerate(("dense", "moe")):
        sse = ((x[:, m] - x_hat[:, m]) ** 2).sum()
        sst = ((x[:, m] - x[:, m].mean(0)) ** 2).sum()
        got = diff.summary["reconstruction"]["fve_per_model"][name]
        assert got == pytest.approx(float(1 - sse / sst), rel=1e-6)
    assert diff.summary["reconstruction"]["fve_per_model"]["moe"] > 0.99
    # the artifact's dense component is left unexplained, so dense FVE is visibly lower
    assert diff.summary["reconstruction"]["fve_per_model"]["dense"] < 0.99
    l0 = float((data.cc.encode(data.acts) > 0).sum(-1).float().mean())
    assert diff.summary["reconstruction"]["l0"] == pytest.approx(l0)
    assert diff.summary["reconstruction"]["dead_fraction"] == pytest.approx(4 / len(diff.table))


def test_domain_shares_and_experts(data, diff):
    row = diff.table.loc[CODE_ONLY]
    assert row["share_code"] == pytest.approx(1.0)
    assert row["share_science"] == 0 and row["share_stories"] == 0
    shares = diff.table[["share_code", "share_science", "share_stories"]].to_numpy()
    live = diff.table["class"] != "dead"
    np.testing.assert_allclose(shares[live].sum(1), 1.0)
    tied = diff.table.loc[EXPERT_TIED]
    assert tied["top_expert"] == 3
    assert tied["top_expert_share"] == pytest.approx(0.5)  # expert 3 plus one other of the top 2
    other = diff.table.drop(index=EXPERT_TIED)
    assert (other.loc[other["class"] != "dead", "top_expert_share"] < 0.4).all()
    assert tied["expert_entropy"] < other.loc[other["class"] == "shared", "expert_entropy"].min()
    assert diff.summary["experts"]["n_experts"] == N_EXPERTS
    assert diff.summary["experts"]["routing_entropy"] == pytest.approx(3.0, abs=0.01)
    assert pd.isna(diff.table.loc[data.truth["dead"][0], "expert_entropy"])


def test_latent_scaling_flags_the_shrinkage_artifact_only(data, diff):
    t = diff.table
    artifact = data.truth["artifact"][0]
    assert t.loc[artifact, "class"] == "moe-only"
    assert t.loc[artifact, "scaling_artifact"]
    # dense carries the artifact at full strength along its own (free, fitted) direction
    assert t.loc[artifact, "scaling_ratio"] == pytest.approx(1.0, abs=0.05)
    genuine = data.truth["moe-only"] + data.truth["dense-only"]
    assert not t.loc[genuine, "scaling_artifact"].any()
    # the other model carries a genuine latent at 5% of its own strength (the planted 0.05),
    # which ~1000 firing tokens resolve only to within a few hundredths: far below tolerance
    moe_only = data.truth["moe-only"]
    assert (t.loc[moe_only, ["scaling_ratio", "scaling_ratio_rec"]] < 0.15).all().all()
    assert 0.02 < t.loc[moe_only, "scaling_ratio"].mean() < 0.08
    assert (t.loc[moe_only, "scaling_share_dense"] < 0.001).all()
    # dense-only latents fire on fewer than MIN_FIRINGS = 100 of the 6000 tokens: not fitted
    assert (t.loc[data.truth["dense-only"], "fire_count"] < 100).all()
    assert t.loc[data.truth["dense-only"], "scaling_ratio"].isna().all()
    assert t.loc[data.truth["shared"], "scaling_ratio"].isna().all()  # only model-specific
    assert t[["nu_err", "nu_rec"]].isna().all().all()  # Minder's form: only with same_basis
    assert diff.summary["latent_scaling"]["n_flagged"] == {"dense-only": 0, "moe-only": 1}
    assert diff.summary["latent_scaling"]["columns"] == ["scaling_ratio", "scaling_ratio_rec"]
    assert diff.config["same_basis"] is False
    assert diff.summary["decoder_cosine"]["meaningful"] is False


def test_anchor_split_and_custom_split(data):
    diff = diff_features(
        data.cc, data.acts, metadata=data.metadata, split="anchors", show_progress=False,
        latent_scaling=False, batch_size=3000,
    )  # fmt: skip
    assert diff.summary["split"]["name"] == "anchors"
    assert (diff.summary["split"]["lo"], diff.summary["split"]["hi"]) == (0.1, 0.9)
    assert diff.summary["class_counts"]["dense-only"] == 8
    strict = diff_features(
        data.cc, data.acts, metadata=data.metadata, split=(0.01, 0.99), show_progress=False,
        latent_scaling=False, batch_size=3000,
    )  # fmt: skip
    assert strict.summary["class_counts"]["dense-only"] == 0
    assert strict.summary["class_counts"]["shared"] == 4 + 12 + 8 + 8 + 1  # designated: free


def test_max_tokens_takes_spread_chunks(data):
    diff = diff_features(
        data.cc, data.acts, metadata=data.metadata, max_tokens=1500, show_progress=False,
        batch_size=500,
    )  # fmt: skip
    assert diff.summary["n_tokens"] == 1500
    assert diff.config["n_token_ranges"] > 1
    token_share = diff.summary["domains"]["token_share"]
    assert min(token_share.values()) > 0.2  # every domain is sampled, not just the first docs


def test_direction_swaps_classes(data):
    diff = diff_features(
        data.cc, data.acts, metadata=data.metadata, direction=("moe", "dense"),
        show_progress=False, latent_scaling=False, batch_size=3000,
    )  # fmt: skip
    assert diff.summary["direction"]["A"] == "moe"
    labels = diff.table["class"].to_numpy()
    assert set(labels[data.truth["dense-only"]]) == {"dense-only"}
    r = diff.table["relative_norm"].to_numpy()
    assert (r[data.truth["dense-only"]] > 0.9).all()


def test_works_without_metadata(data):
    diff = diff_features(data.cc, data.acts, show_progress=False, batch_size=3000)
    assert "share_code" not in diff.table and "expert_entropy" not in diff.table
    assert diff.summary["experts"]["recorded"] is False
    assert diff.summary["class_counts"]["moe-only"] == 9


def test_bad_input_raises_clear_errors(data):
    with pytest.raises(CrossdiffError, match="unknown class split"):
        diff_features(data.cc, data.acts, split="median")
    with pytest.raises(CrossdiffError, match="0 < lo < 0.5 < hi < 1"):
        diff_features(data.cc, data.acts, split=(0.6, 0.7))
    with pytest.raises(CrossdiffError, match="must name two different models"):
        diff_features(data.cc, data.acts, direction=("dense", "chat"))
    with pytest.raises(CrossdiffError, match="reads 2 models but the activations have 3"):
        diff_features(data.cc, torch.zeros(10, 3, 48), model_names=("a", "b", "c"))
    with pytest.raises(CrossdiffError, match="2 model names"):
        diff_features(data.cc, torch.zeros(10, 3, 48))
    with pytest.raises(CrossdiffError, match="has d_model 48"):
        diff_features(data.cc, torch.zeros(10, 2, 32))
    with pytest.raises(CrossdiffError, match="metadata\\['domains'\\] has 3 rows"):
        diff_features(data.cc, data.acts, metadata={"domains": torch.zeros(3)})
    with pytest.raises(CrossdiffError, match="n_tokens, n_models, d_model"):
        diff_features(data.cc, torch.zeros(10, 48))
