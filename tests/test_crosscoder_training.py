"""Training: aux loss, threshold, k annealing, init, checkpoints/resume, stores, recovery."""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

import crossdiff.crosscoder.train as trainer_module
from crossdiff.crosscoder import (
    CrossCoderConfig,
    TrainingCrossCoder,
    TrainingCrossCoderConfig,
    evaluate_crosscoder,
    train_crosscoder,
)
from crossdiff.crosscoder.prefetch import prefetch_to_device
from crossdiff.crosscoder.synthetic import (
    InMemoryStore,
    match_planted_latents,
    planted_crosscoder_data,
)
from crossdiff.plumbing.common import CrossdiffError

pytestmark = pytest.mark.usefixtures("one_thread")


def small_acts(n=512, seed=0):
    acts, _ = planted_crosscoder_data(n, 8, 6, 3, 3, seed=seed, densities=(0.1, 0.3))
    return acts * torch.tensor([1.0, 5.0])[None, :, None] + 0.5


def step_input(x, step=0, dead=None):
    return TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=dead,
        n_training_steps=step,
        is_logging_step=False,
    )


def test_aux_loss_is_weighted_once_and_summed_into_the_loss():
    torch.manual_seed(0)
    cfg = TrainingCrossCoderConfig(d_model=8, d_sae=32, k=2, aux_loss_coefficient=0.25, k_aux=4)
    sae = TrainingCrossCoder(cfg)
    x = torch.randn(16, 2, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True  # 10 dead >= k_aux, so the loss is not scaled down
    out = sae.training_forward_pass(step_input(x, dead=dead))
    with torch.no_grad():
        pre = sae.pre_activations(x)
        residual = (x - out.sae_out).flatten(1)
        top = pre[:, :10].topk(4, dim=-1)
        recon = torch.zeros(16, 16)
        for row in range(16):
            for value, latent in zip(top.values[row], top.indices[row], strict=True):
                recon[row] += value.relu() * sae.W_dec[latent].flatten()
        direct = (recon - residual).pow(2).sum(-1).mean()
    aux = out.losses["auxiliary_reconstruction_loss"]
    torch.testing.assert_close(aux, 0.25 * direct)
    torch.testing.assert_close(out.loss, out.losses["mse_loss"] + aux)
    no_dead = sae.training_forward_pass(step_input(x, dead=torch.zeros(32, dtype=torch.bool)))
    assert float(no_dead.losses["auxiliary_reconstruction_loss"]) == 0.0


def test_sparse_training_decode_equals_dense_decode_and_keeps_k_per_token():
    torch.manual_seed(0)
    sae = TrainingCrossCoder(TrainingCrossCoderConfig(d_model=8, d_sae=32, k=3))
    x = torch.randn(20, 2, 8)
    out = sae.training_forward_pass(step_input(x))
    assert int((out.feature_acts > 0).sum()) == 60
    torch.testing.assert_close(out.sae_out, sae.decode_dense(out.feature_acts))


def test_threshold_is_a_moving_average_of_the_smallest_selected_score():
    torch.manual_seed(0)
    sae = TrainingCrossCoder(TrainingCrossCoderConfig(d_model=8, d_sae=32, k=2, threshold_lr=0.1))

    def smallest_score(x):
        f = sae.encode_topk(x)
        scores = f * sae.selection_weights()
        return scores[f > 0].min()

    x0, x1 = torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    s0, s1 = smallest_score(x0), smallest_score(x1)
    sae.training_forward_pass(step_input(x0, step=0))
    torch.testing.assert_close(sae.threshold, s0)
    sae.training_forward_pass(step_input(x1, step=1))
    torch.testing.assert_close(sae.threshold, 0.9 * s0 + 0.1 * s1)


def test_k_annealing_goes_from_start_to_k():
    cfg = TrainingCrossCoderConfig(d_model=8, d_sae=32, k=2, k_anneal_start=10, k_anneal_steps=8)
    assert [cfg.k_at_step(s) for s in (0, 4, 8, 100)] == [10.0, 6.0, 2.0, 2.0]
    sae = TrainingCrossCoder(cfg)
    out = sae.training_forward_pass(step_input(torch.randn(4, 2, 8), step=0))
    assert int((out.feature_acts > 0).sum()) == 40
    with pytest.raises(CrossdiffError, match="k_anneal_start"):
        TrainingCrossCoderConfig(d_model=8, d_sae=32, k=2, k_anneal_start=1, k_anneal_steps=8)


def test_decoder_bias_starts_at_the_per_model_mean_and_schedule_warms_up_and_decays():
    acts = small_acts()
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    cc = train_crosscoder(
        acts, cfg, steps=20, batch_size=64, lr=1e-9, lr_warmup_steps=5, log_every=1
    )
    # folded back to raw units: b_dec equals the raw per-model mean (scaled mean / factor)
    torch.testing.assert_close(cc.b_dec, acts.mean(0), rtol=1e-3, atol=1e-3)
    lrs = [row["lr"] for row in cc.training_summary["history"]]
    assert lrs[0] < lrs[5] and max(lrs) == pytest.approx(1e-9) and lrs[-1] < 0.3e-9


def test_training_reduces_error_and_reports_metrics():
    acts = small_acts(2048)
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    untrained = evaluate_crosscoder(train_crosscoder(acts, cfg, steps=1, batch_size=64), acts)
    cc = train_crosscoder(acts, cfg, steps=300, batch_size=128, lr=3e-3)
    metrics = evaluate_crosscoder(cc, acts)
    assert metrics["fve"] > 0.9 > untrained["fve"]
    assert len(metrics["fve_per_model"]) == 2 and len(metrics["mse_per_model"]) == 2
    assert metrics["l0_topk"] == pytest.approx(2.0)
    assert 0.5 < metrics["l0"] < 6
    assert 0 <= metrics["dead_fraction"] < 1
    assert cc.cfg.metadata.crossdiff_training["steps"] == 300


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path, monkeypatch):
    acts = small_acts()
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2, n_shared=4, shared_decoder="tied")
    opts = {"steps": 24, "batch_size": 64, "lr": 1e-2, "dead_after_tokens": 64 * 3}
    straight = train_crosscoder(acts, cfg, **opts)

    real_batches = trainer_module._TensorSource.batches

    def interrupted(self, *args, **kwargs):
        for i, batch in enumerate(real_batches(self, *args, **kwargs)):
            if i == 13:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(trainer_module._TensorSource, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(acts, cfg, checkpoint_dir=tmp_path, checkpoint_every=10, **opts)
    monkeypatch.setattr(trainer_module._TensorSource, "batches", real_batches)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["state.json", "state_000000010.safetensors"]

    resumed = train_crosscoder(acts, cfg, checkpoint_dir=tmp_path, checkpoint_every=10, **opts)
    assert resumed.training_summary["resumed_from_step"] == 10
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-6, atol=1e-7)

    other = CrossCoderConfig(d_model=8, d_sae=48, k=2, n_shared=4, shared_decoder="tied")
    with pytest.raises(CrossdiffError, match="another shape"):
        train_crosscoder(acts, other, checkpoint_dir=tmp_path, **opts)
    with pytest.raises(CrossdiffError, match="other options"):
        train_crosscoder(acts, cfg, checkpoint_dir=tmp_path, **(opts | {"batch_size": 32}))


def test_non_finite_activations_are_named():
    acts = small_acts()
    acts[5, 1, 3] = float("nan")
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    with pytest.raises(CrossdiffError, match="token 5, model 1, dimension 3"):
        train_crosscoder(acts, cfg, steps=2, batch_size=64)
    cc = train_crosscoder(small_acts(), cfg, steps=2, batch_size=64)
    with pytest.raises(CrossdiffError, match="non-finite"):
        evaluate_crosscoder(cc, acts)


def test_training_on_a_store_uses_its_scaling_factors_and_checks_it():
    acts = small_acts(1024)
    store = InMemoryStore(acts)
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    cc = train_crosscoder(store, cfg, steps=150, batch_size=128, lr=3e-3)
    torch.testing.assert_close(cc.scaling_factors, store.scaling_factors)
    on_store, on_tensor = evaluate_crosscoder(cc, store), evaluate_crosscoder(cc, acts)
    assert on_store["fve"] == pytest.approx(on_tensor["fve"], abs=1e-6) and on_store["fve"] > 0.8

    with pytest.raises(CrossdiffError, match="different widths"):
        train_crosscoder(InMemoryStore(acts, d_models=(8, 6)), cfg, steps=2, batch_size=64)
    with pytest.raises(CrossdiffError, match="n_models=2, d_model=8"):
        train_crosscoder(store, CrossCoderConfig(d_model=6, d_sae=32, k=2), steps=2)

    class ShortBatches(InMemoryStore):
        def iter_batches(self, batch_size, **kw):
            for batch in super().iter_batches(batch_size, **kw):
                yield batch[: batch_size // 2]

    with pytest.raises(CrossdiffError, match="yielded a batch of shape"):
        train_crosscoder(ShortBatches(acts), cfg, steps=2, batch_size=64)


def recovery(cc, truth, **kw):
    return match_planted_latents(cc.W_dec, cc.decoder_norms(), truth, **kw)


@pytest.mark.slow  # 6-12 s of training
def test_free_crosscoder_recovers_and_classifies_planted_latents():
    # 24 shared latents (own direction in each model) + 12 A-only + 12 B-only in 32 dimensions;
    # model B's activations are 2x larger, which the normalized decoder norms must undo.
    acts, truth = planted_crosscoder_data(
        30000, 32, 24, 12, 12, densities=(0.01, 0.05), scales=(1.0, 2.0), seed=0
    )
    cfg = CrossCoderConfig(d_model=32, d_sae=64, k=1.2, shared_decoder="free")
    cc = train_crosscoder(acts, cfg, steps=1000, batch_size=256, lr=3e-3, seed=0)
    result = recovery(cc, truth)
    assert result["recovered_fraction"] >= 0.9
    assert result["classified_fraction"] >= 0.95


@pytest.mark.slow  # 6-12 s of training
def test_tied_crosscoder_recovers_shared_latents_with_designated_latents():
    acts, truth = planted_crosscoder_data(
        30000, 32, 24, 12, 12, aligned_bases=True, densities=(0.01, 0.05), seed=0
    )
    cfg = CrossCoderConfig(d_model=32, d_sae=64, k=1.2, n_shared=24, shared_decoder="tied")
    cc = train_crosscoder(acts, cfg, steps=1000, batch_size=256, lr=3e-3, seed=0)
    overall = recovery(cc, truth)
    assert overall["recovered_fraction"] >= 0.9 and overall["classified_fraction"] >= 0.95
    by_designated = recovery(cc, truth, candidates=list(range(24)))
    shared = [m for m in by_designated["matches"] if m["kind"] == "shared"]
    assert sum(m["cosine"] >= 0.9 for m in shared) >= 0.9 * len(shared)
    assert all(m["class"] == "shared" for m in shared)


@pytest.mark.parametrize("mode", ["free", "tied"])
def test_sparse_gradients_equal_the_dense_computation(mode):
    torch.manual_seed(0)
    cfg = TrainingCrossCoderConfig(
        d_model=8,
        d_sae=32,
        k=3,
        n_shared=6,
        shared_decoder=mode,
        k_aux=4,
        aux_loss_coefficient=0.5,
    )
    sae = TrainingCrossCoder(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(24, 2, 8) * 2
    dead = torch.zeros(32, dtype=torch.bool)
    dead[10:20] = True
    out = sae.training_forward_pass(step_input(x, step=1, dead=dead))
    out.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.numel()}
    sae.zero_grad()

    pre = sae.pre_activations(x)  # dense, with gradient everywhere
    chosen = out.feature_acts > 0
    f = torch.where(chosen, pre.relu(), torch.zeros_like(pre))
    recon = sae.decode_dense(f)
    mse = (recon - x).pow(2).sum(dim=(-2, -1)).mean()
    top = pre.detach().masked_fill(~dead[None], float("-inf")).topk(4, dim=-1).indices
    aux_f = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top).relu())
    aux_recon = aux_f @ sae.W_dec.reshape(32, 16)
    residual = (x - recon).detach().flatten(1)
    aux = 0.5 * (aux_recon - residual).pow(2).sum(-1).mean()
    (mse + aux).backward()
    assert set(sparse_grads) >= {"W_enc", "b_enc", "b_dec", "W_dec_untied"}
    for name, param in sae.named_parameters():
        if param.numel():
            torch.testing.assert_close(sparse_grads[name], param.grad, rtol=1e-4, atol=1e-5)


def test_wandb_logging_path_runs(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    acts = small_acts()
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    cc = train_crosscoder(acts, cfg, steps=24, batch_size=64, log_every=2, wandb=True)
    assert cc.training_summary["steps"] == 24 and len(cc.training_summary["history"]) >= 12


def test_resume_on_a_store_replays_exactly_the_uninterrupted_batches(tmp_path, monkeypatch):
    store = InMemoryStore(small_acts())
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    opts = {"steps": 24, "batch_size": 64, "lr": 1e-2}
    straight = train_crosscoder(store, cfg, **opts)

    real_batches = trainer_module._StoreSource.batches

    def interrupted(self, *args, **kwargs):
        for i, batch in enumerate(real_batches(self, *args, **kwargs)):
            if i == 15:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(trainer_module._StoreSource, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(store, cfg, checkpoint_dir=tmp_path, checkpoint_every=10, **opts)
    monkeypatch.setattr(trainer_module._StoreSource, "batches", real_batches)
    resumed = train_crosscoder(store, cfg, checkpoint_dir=tmp_path, checkpoint_every=10, **opts)
    assert resumed.training_summary["resumed_from_step"] == 10
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_training_works_with_progress_bars_disabled(monkeypatch):
    # users silence tqdm (TQDM_DISABLE=1, read when tqdm is imported); a disabled bar has no `unit`
    import functools

    import sae_lens.training.sae_trainer as sae_trainer

    monkeypatch.setattr(sae_trainer, "tqdm", functools.partial(sae_trainer.tqdm, disable=True))
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    cc = train_crosscoder(small_acts(), cfg, steps=3, batch_size=64)
    assert cc.training_summary["steps"] == 3


@pytest.mark.parametrize("n_dead", [0, 3, 10])
def test_sync_free_aux_loss_equals_the_counted_one(n_dead):
    """The accelerator path (fixed k_aux, non-dead picks weighted 0) gives the CPU path's loss
    and gradients, with fewer, as many and more dead latents than k_aux."""
    torch.manual_seed(1)
    cfg = TrainingCrossCoderConfig(d_model=8, d_sae=32, k=2, aux_loss_coefficient=0.5, k_aux=4)
    sae = TrainingCrossCoder(cfg)
    x = torch.randn(16, 2, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32)[:n_dead]] = True
    recon = sae.decode_dense(sae.encode_with_hidden_pre(x)[0]).detach()
    losses, grads = [], []
    for sync_free in (False, True):
        sae.zero_grad()
        loss = sae.aux_loss(x, recon, sae.pre_activations(x), dead, sync_free=sync_free)
        if loss.requires_grad:
            loss.backward()
        losses.append(loss.detach())
        grads.append(sae.W_enc.grad.clone() if sae.W_enc.grad is not None else torch.zeros(1))
    torch.testing.assert_close(losses[1], losses[0])
    assert (float(losses[0]) > 0) == (n_dead > 0)
    if n_dead:
        torch.testing.assert_close(grads[1], grads[0])


def test_bfloat16_autocast_trains_as_well_as_float32():
    acts = small_acts(2048)
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    runs = {
        autocast: train_crosscoder(acts, cfg, steps=200, batch_size=128, lr=3e-3, autocast=autocast)
        for autocast in (False, True)
    }
    fve = {a: evaluate_crosscoder(cc, acts)["fve"] for a, cc in runs.items()}
    assert fve[True] > 0.85 and abs(fve[True] - fve[False]) < 0.05
    for cc in runs.values():  # master weights stay float32 under autocast
        assert cc.W_enc.dtype == torch.float32 and cc.threshold.dtype == torch.float32
    assert not torch.equal(runs[True].W_enc, runs[False].W_enc)  # autocast really ran


def test_prefetch_keeps_order_and_raises_the_source_error_at_its_batch():
    batches = [torch.full((4, 2, 3), float(i)) for i in range(7)]
    got = list(prefetch_to_device(iter(batches), torch.device("cpu"), depth=3))
    assert [int(b[0, 0, 0]) for b in got] == list(range(7))

    def failing():
        yield batches[0]
        yield batches[1]
        raise CrossdiffError("store shard 3 is corrupted")

    received = []
    with pytest.raises(CrossdiffError, match="shard 3"):
        for batch in prefetch_to_device(failing(), torch.device("cpu"), depth=2):
            received.append(batch)
    assert len(received) == 2
