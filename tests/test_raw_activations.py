"""Training on a store's raw activations (the seed paper fork's way) against the default scaling.

Planted: every feature shared, model B's activations 4x model A's. Scaled per model (crossdiff's
default), the two decoders carry a shared feature equally (r near 0.5); raw, the crosscoder puts
the weight where the variance is, so relative norms lean toward B. That lean is what the option
is for: the paper's class counts may owe to it, and the report shows the two runs side by side.
"""

from __future__ import annotations

import torch

from crossdiff import CrossCoderConfig, train_crosscoder
from crossdiff.activations import ActivationStore
from crossdiff.activations.store import FORMAT, FORMAT_VERSION, StoreWriter
from crossdiff.analysis.classes import relative_norm
from crossdiff.crosscoder.synthetic import planted_crosscoder_data

D = 32


def _store(path) -> ActivationStore:
    acts, _ = planted_crosscoder_data(
        6144, D, n_shared=24, n_a_only=0, n_b_only=0, densities=(0.02, 0.08), scales=(1.0, 4.0)
    )
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_names": ["dense", "moe"],
        "hook_points": {"dense": ["h"], "moe": ["h"]},
        "dtype": "float32",
        "d_model": D,
        "d_models": [D, D],
        "experts": {"model": None, "hooks": [], "width": 1},
        "domain_names": ["code"],
        "segments": [{"token_set": "planted", "start": 0, "n_tokens": 0}],
    }
    writer = StoreWriter.create(path, header)
    n = acts.shape[0]
    for lo in range(0, n, 2048):
        hi = min(lo + 2048, n)
        writer.write_shard(
            {
                "acts": acts[lo:hi],
                "token_ids": torch.arange(lo, hi, dtype=torch.int32),
                "doc_ids": torch.arange(lo, hi, dtype=torch.int64) // 64,
                "positions": torch.arange(lo, hi, dtype=torch.int32) % 64,
                "domains": torch.zeros(hi - lo, dtype=torch.int16),
                "experts": torch.full((hi - lo, 1), -1, dtype=torch.int16),
            }
        )
    return ActivationStore(path)


def _median_r(store: ActivationStore, normalize: bool) -> float:
    cfg = CrossCoderConfig(n_models=2, d_model=D, d_sae=64, k=2)
    cc = train_crosscoder(
        store, cfg, steps=400, batch_size=256, normalize=normalize, seed=0, log_every=10**9
    )
    norms = cc.decoder_norms().detach()  # in training units, as diff_features reads them
    live = norms.sum(1) > 1e-3 * norms.sum(1).max()
    return float(relative_norm(norms[live], 0, 1).median())


def test_raw_activations_lean_relative_norms_toward_the_larger_model(tmp_path):
    store = _store(tmp_path / "store")
    scaled, raw = _median_r(store, True), _median_r(store, False)
    assert 0.4 < scaled < 0.6, scaled
    assert raw > 0.7, raw
