"""Training on a store's raw activations (the seed paper fork's way) against the default scaling.

Planted: every feature shared, model B's activations 4x model A's. Scaled per model (crossdiff's
default), the two decoders carry a shared feature equally (r near 0.5); raw, the crosscoder puts
the weight where the variance is, so relative norms lean toward B. That lean is what the option
is for: the paper's class counts may owe to it (docs/findings.md sets the two side by side).
"""

from __future__ import annotations

import pytest
from planted_store import write_planted_store

from crossdiff import CrossCoderConfig, train_crosscoder
from crossdiff.activations import ActivationStore
from crossdiff.analysis.classes import relative_norm
from crossdiff.crosscoder.synthetic import planted_crosscoder_data

D = 32


def _store(path) -> ActivationStore:
    acts, _ = planted_crosscoder_data(
        6144, D, n_shared=24, n_a_only=0, n_b_only=0, densities=(0.02, 0.08), scales=(1.0, 4.0)
    )
    return write_planted_store(path, acts, shard=2048)


def _median_r(store: ActivationStore, normalize: bool) -> float:
    cfg = CrossCoderConfig(n_models=2, d_model=D, d_sae=64, k=2)
    cc = train_crosscoder(
        store, cfg, steps=400, batch_size=256, normalize=normalize, seed=0, log_every=10**9
    )
    norms = cc.decoder_norms().detach()  # in training units, as diff_features reads them
    live = norms.sum(1) > 1e-3 * norms.sum(1).max()
    return float(relative_norm(norms[live], 0, 1).median())


@pytest.mark.slow  # two trainings
def test_raw_activations_lean_relative_norms_toward_the_larger_model(tmp_path):
    store = _store(tmp_path / "store")
    scaled, raw = _median_r(store, True), _median_r(store, False)
    assert 0.4 < scaled < 0.6, scaled
    assert raw > 0.7, raw
