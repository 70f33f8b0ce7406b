"""The seed paper fork's training rules, each an option next to crossdiff's default: every
formula pinned against a hand computation, the defaults pinned to today's behaviour, the options
carried through cfg.json and the run identity, and a short run with all of them on planted data."""

import argparse
import json

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

import crossdiff.crosscoder.commands as commands
from crossdiff.crosscoder import (
    CrossCoder,
    CrossCoderConfig,
    TrainingCrossCoder,
    TrainingCrossCoderConfig,
    evaluate_crosscoder,
    train_crosscoder,
)
from crossdiff.crosscoder.checkpoint import run_identity
from crossdiff.crosscoder.config import FORK_OPTION_NAMES
from crossdiff.crosscoder.model import code_weights
from crossdiff.crosscoder.synthetic import (
    InMemoryStore,
    match_planted_latents,
    planted_crosscoder_data,
)
from crossdiff.crosscoder.train import geometric_median
from crossdiff.plumbing.common import CrossdiffError
from crossdiff.plumbing.preset_args import apply_preset
from crossdiff.run.pipeline import resolve_options
from crossdiff.run.validation import allowed_options, validate_run_options

FORK = {
    "code_normalization": "mixed",
    "shared_penalty": "sparsity",
    "threshold_schedule": "ema",
    "aux_loss": "fork",
    "recon_loss": "l2",
    "b_dec_init": "geometric_median",
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_input(x, step=0, dead=None):
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step,
        is_logging_step=False,
    )  # fmt: skip


def with_norms(sae, norms):
    """Give latent i of `sae` the per-model decoder norms norms[i] (random directions)."""
    with torch.no_grad():
        sae.W_dec_untied.copy_(
            torch.nn.functional.normalize(sae.W_dec_untied, dim=-1) * norms[..., None]
        )
    return sae


def test_defaults_are_todays_selection_and_leave_cfg_and_identity_unchanged():
    torch.manual_seed(0)
    cfg = CrossCoderConfig(d_model=8, d_sae=16, k=2, n_shared=4, shared_penalty_ratio=0.5)
    cc = with_norms(CrossCoder(cfg), torch.rand(16, 2) * 3)
    today = cc.decoder_norms().sum(-1)
    today[:4] /= 0.5
    torch.testing.assert_close(cc.selection_weights(), today)
    tcfg = TrainingCrossCoderConfig(d_model=8, d_sae=16, k=2)
    for written in (cfg.to_dict(), tcfg.to_dict(), run_identity(tcfg, {}, "data")["config"]):
        assert not set(written) & {*FORK, "code_normalization_alpha", "threshold_beta"}
    assert tcfg.shared_sparsity_coefficient is None and tcfg.sparsity_coefficient is None


def test_code_normalizations_weight_selection_as_computed_by_hand():
    # latent 0: norms (3, 4): sum 7, concat 5; latent 1: (1, 0): 1 and 1
    norms = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    by_hand = {"sum": [7.0, 1.0], "concat": [5.0, 1.0], "mixed": [0.7 * 5 + 0.3 * 7, 1.0]}
    for mode, expected in by_hand.items():
        torch.testing.assert_close(code_weights(norms, mode, 0.7), torch.tensor(expected))
        cfg = CrossCoderConfig(d_model=4, d_sae=2, k=1, code_normalization=mode)
        cc = with_norms(CrossCoder(cfg), norms)
        torch.testing.assert_close(cc.selection_weights(), torch.tensor(expected))
        x = torch.randn(5, 2, 4)
        pre = cc.pre_activations(x).relu()
        cc.threshold.fill_(0.3)  # inference keeps latents whose code-weighted score exceeds it
        kept = torch.where(pre * torch.tensor(expected) > 0.3, pre, 0)
        torch.testing.assert_close(cc.encode(x), kept)
    mixed = CrossCoderConfig(d_model=4, d_sae=2, k=1, code_normalization="mixed")
    mixed.code_normalization_alpha = 0.25
    cc = with_norms(CrossCoder(mixed), norms)
    torch.testing.assert_close(cc.selection_weights(), torch.tensor([0.25 * 5 + 0.75 * 7, 1.0]))


def test_sparsity_mode_does_not_divide_the_shared_scores():
    norms = torch.rand(16, 2) + 0.5
    kw = {"d_model": 8, "d_sae": 16, "k": 2, "n_shared": 4, "shared_penalty_ratio": 0.5}
    selection = with_norms(CrossCoder(CrossCoderConfig(**kw)), norms)
    sparsity = with_norms(CrossCoder(CrossCoderConfig(**kw, shared_penalty="sparsity")), norms)
    torch.testing.assert_close(sparsity.selection_weights(), norms.sum(-1))
    torch.testing.assert_close(selection.selection_weights()[:4], norms[:4].sum(-1) / 0.5)


@pytest.mark.parametrize("shared_decoder", ["free", "tied"])
def test_sparsity_penalty_matches_a_hand_computation(shared_decoder):
    torch.manual_seed(1)
    cfg = TrainingCrossCoderConfig(
        d_model=6, d_sae=12, k=3, n_shared=4, shared_decoder=shared_decoder,
        shared_penalty="sparsity", aux_loss_coefficient=0.5,
    )  # fmt: skip
    assert (cfg.sparsity_coefficient, cfg.shared_sparsity_coefficient) == (0.5, 0.15 * 0.5)
    sae = TrainingCrossCoder(cfg)
    x = torch.randn(10, 2, 6)
    out = sae.training_forward_pass(step_input(x))
    f, W = out.feature_acts, sae.W_dec.detach()
    by_hand = 0.0
    for token in range(10):
        for i in range(12):
            if i < 4:
                by_hand += 0.075 * f[token, i] * (W[i, 0] + W[i, 1]).div(2).norm()
            else:
                by_hand += 0.5 * f[token, i] * (W[i, 0].norm() + W[i, 1].norm())
    torch.testing.assert_close(out.losses["sparsity_loss"], by_hand / 10)
    torch.testing.assert_close(out.loss, out.losses["mse_loss"] + out.losses["sparsity_loss"])
    out.loss.backward()  # the penalty reaches the decoder, as the fork's does
    assert float(sae.W_dec_untied.grad.abs().sum()) > 0
    explicit = TrainingCrossCoderConfig(
        d_model=6, d_sae=12, k=3, shared_penalty="sparsity", sparsity_coefficient=0.0,
        shared_sparsity_coefficient=0.0,
    )  # fmt: skip
    zero = TrainingCrossCoder(explicit).training_forward_pass(step_input(x))
    assert float(zero.losses["sparsity_loss"].detach()) == 0.0


def test_l2_reconstruction_loss_is_the_mean_norm_per_token_and_model():
    torch.manual_seed(2)
    sae = TrainingCrossCoder(TrainingCrossCoderConfig(d_model=6, d_sae=12, k=3, recon_loss="l2"))
    x = torch.randn(10, 2, 6)
    out = sae.training_forward_pass(step_input(x))
    err = out.sae_out - x
    by_hand = sum(err[t, m].norm() for t in range(10) for m in range(2)) / 20
    torch.testing.assert_close(out.losses["l2_loss"], by_hand)
    torch.testing.assert_close(out.loss, by_hand + out.losses["auxiliary_reconstruction_loss"])
    torch.testing.assert_close(out.losses["mse_loss"], err.pow(2).sum(dim=(1, 2)).mean())


def test_ema_threshold_waits_for_the_start_step_then_follows_the_fork_recurrence():
    cfg = TrainingCrossCoderConfig(
        d_model=4, d_sae=8, k=1, threshold_schedule="ema", threshold_beta=0.9,
        threshold_start_step=3,
    )  # fmt: skip
    sae = TrainingCrossCoder(cfg)
    smallest = [0.5, 0.7, 0.2, 0.4, 0.9, 0.3, 0.6]
    expected, thr = [], None
    for step, low in enumerate(smallest):
        sae._update_threshold(torch.tensor([low + 1.0, 0.0, low, low + 2.0]), step=step)
        if step > 3:  # the fork: steps after threshold_start_step; the first sets it outright
            thr = low if thr is None else 0.9 * thr + 0.1 * low
        expected.append(0.0 if thr is None else thr)
        torch.testing.assert_close(sae.threshold, torch.tensor(expected[-1]))
    assert expected[:4] == [0.0] * 4
    # no positive score in a step: the threshold is left as it was
    sae._update_threshold(torch.zeros(4), step=10)
    torch.testing.assert_close(sae.threshold, torch.tensor(expected[-1]))


def test_rate_threshold_is_still_set_at_step_0_then_moves_at_threshold_lr():
    sae = TrainingCrossCoder(TrainingCrossCoderConfig(d_model=4, d_sae=8, k=1, threshold_lr=0.1))
    sae._update_threshold(torch.tensor([0.5, 2.0]), step=0)
    sae._update_threshold(torch.tensor([0.9, 0.0]), step=1)
    torch.testing.assert_close(sae.threshold, torch.tensor(0.9 * 0.5 + 0.1 * 0.9))


def test_geometric_median_of_each_model_against_known_configurations():
    # model 0: corners of a triangle (two of them twice): its median is the point where the
    # unit vectors to the points cancel, not the mean. Model 1: five collinear points, median
    # the middle one (2, 0), far from the mean (which the outlier at 50 drags).
    triangle = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 3.0], [0.0, 0.0], [4.0, 0.0]])
    line = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [3.0, 0.0], [50.0, 0.0]])
    points = torch.stack([triangle, line], dim=1)  # [5 points, 2 models, 2 dims]
    median = geometric_median(points)
    torch.testing.assert_close(median[1], torch.tensor([2.0, 0.0]), atol=1e-3, rtol=0)
    pull = torch.nn.functional.normalize(points[:, 0] - median[0], dim=-1)
    assert float(pull.sum(0).norm()) < 1e-3 * len(points)
    mean = points.mean(0)

    def total_distance(center):
        return (points - center).norm(dim=-1).sum(0)

    assert bool((total_distance(median) < total_distance(mean) - 1e-3).all())
    torch.testing.assert_close(geometric_median(points), median, rtol=0, atol=0)


def test_fork_aux_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    cfg = TrainingCrossCoderConfig(
        d_model=8, d_sae=32, k=2, aux_loss_coefficient=0.25, aux_loss="fork",
        code_normalization="mixed",
    )  # fmt: skip
    sae = TrainingCrossCoder(cfg)
    with torch.no_grad():  # unequal decoder norms, so weighting the ranking matters
        sae.W_dec_untied.mul_(torch.rand(32, 2, 1) * 3)
    x = torch.randn(16, 2, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[3:15] = True
    out = sae.training_forward_pass(step_input(x, dead=dead))
    with torch.no_grad():
        post = sae.pre_activations(x).relu()
        ranking = (post * sae.selection_weights())[:, 3:15]
        residual = (x - out.sae_out).flatten(1)
        top = ranking.topk(4, dim=-1).indices + 3  # k_aux = d_model // 2
        recon = torch.zeros(16, 16)
        for row in range(16):
            for latent in top[row]:
                recon[row] += post[row, latent] * sae.W_dec[latent].flatten()
        error = (recon - residual).pow(2).sum(-1).mean()
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    aux = out.losses["auxiliary_reconstruction_loss"]
    torch.testing.assert_close(aux, 0.25 * error / variance)
    pre = sae.pre_activations(x)
    for sync_free in (False, True):
        loss = sae.aux_loss(x, out.sae_out.detach(), pre, dead, sync_free=sync_free)
        torch.testing.assert_close(loss, aux)
        none_dead = sae.aux_loss(x, out.sae_out, pre, dead & False, sync_free=sync_free)
        assert float(none_dead) == 0.0


def test_fork_options_round_trip_through_cfg_json_and_old_cfg_json_loads(tmp_path):
    cfg = CrossCoderConfig(
        d_model=8, d_sae=16, k=2, n_shared=2, code_normalization="mixed",
        code_normalization_alpha=0.6, shared_penalty="sparsity",
    )  # fmt: skip
    CrossCoder(cfg).save(tmp_path / "fork")
    loaded = CrossCoder.load(tmp_path / "fork")
    assert (loaded.cfg.code_normalization, loaded.cfg.code_normalization_alpha) == ("mixed", 0.6)
    assert loaded.cfg.shared_penalty == "sparsity"
    CrossCoder(CrossCoderConfig(d_model=8, d_sae=16, k=2)).save(tmp_path / "plain")
    written = json.loads((tmp_path / "plain" / "cfg.json").read_text())
    assert "code_normalization" not in written and "shared_penalty" not in written
    old = CrossCoder.load(tmp_path / "plain")  # a cfg.json of before: today's behaviour
    assert (old.cfg.code_normalization, old.cfg.shared_penalty) == ("sum", "selection")


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"code_normalization": "l1"}, "code_normalization='l1'"),
        ({"code_normalization_alpha": 1.5}, "code_normalization_alpha"),
        ({"shared_penalty": "l1"}, "shared_penalty='l1'"),
        ({"threshold_schedule": "cosine"}, "threshold_schedule"),
        ({"threshold_beta": 1.0}, "threshold_beta"),
        ({"threshold_start_step": -1}, "threshold_start_step"),
        ({"aux_loss": "ghost"}, "aux_loss"),
        ({"recon_loss": "l1"}, "recon_loss"),
        ({"b_dec_init": "zero"}, "b_dec_init"),
        ({"sparsity_coefficient": 0.1}, "only with shared_penalty='sparsity'"),
        ({"shared_penalty": "sparsity", "sparsity_coefficient": -1.0}, "sparsity_coefficient"),
    ],
)
def test_bad_fork_option_values_are_refused_with_what_to_do(option, match):
    with pytest.raises(CrossdiffError, match=match):
        TrainingCrossCoderConfig(d_model=8, d_sae=16, k=2, **option)


def test_ema_that_would_never_start_is_refused_and_a_changed_option_is_not_resumed(tmp_path):
    acts, _ = planted_crosscoder_data(512, 8, 6, 3, 3, densities=(0.1, 0.3), seed=0)
    cfg = CrossCoderConfig(d_model=8, d_sae=32, k=2)
    with pytest.raises(CrossdiffError, match="never be set"):
        train_crosscoder(acts, cfg, steps=10, batch_size=64, threshold_schedule="ema")
    opts = {"steps": 6, "batch_size": 64, "checkpoint_dir": tmp_path, "checkpoint_every": 3}
    cc = train_crosscoder(acts, cfg, threshold_schedule="ema", threshold_start_step=2, **opts)
    assert float(cc.threshold) > 0
    with pytest.raises(CrossdiffError, match="threshold_schedule"):
        train_crosscoder(acts, cfg, **opts)
    with pytest.raises(CrossdiffError, match="b_dec_init"):
        train_crosscoder(
            acts, cfg, threshold_schedule="ema", threshold_start_step=2,
            b_dec_init="geometric_median", **opts,
        )  # fmt: skip


@pytest.mark.slow  # about 10 s on the loaded machine
def test_all_fork_options_together_still_recover_planted_latents():
    # 16 shared latents (one direction in both models, so a tied decoder fits them) + 8 A-only +
    # 8 B-only in 32 dimensions; the first 16 latents are designated shared and tied
    acts, truth = planted_crosscoder_data(
        20000, 32, 16, 8, 8, aligned_bases=True, densities=(0.01, 0.05), seed=0
    )
    cfg = CrossCoderConfig(d_model=32, d_sae=64, k=1.2, n_shared=16, shared_decoder="tied")
    cc = train_crosscoder(
        acts, cfg, steps=800, batch_size=256, lr=3e-3, seed=0, threshold_start_step=100,
        code_normalization_alpha=0.7, dead_after_tokens=256 * 20, **FORK,
    )  # fmt: skip
    assert cc.cfg.code_normalization == "mixed" and cc.cfg.shared_penalty == "sparsity"
    result = match_planted_latents(cc.W_dec, cc.decoder_norms(), truth)
    # measured: 0.97 recovered, FVE 0.99 (crossdiff's defaults on this data: 0.75 and 1.0)
    assert result["recovered_fraction"] >= 0.9
    metrics = evaluate_crosscoder(cc, acts[:8192])
    assert metrics["fve"] >= 0.95
    assert float(cc.threshold) > 0


def test_paper_preset_uses_the_fork_options_and_every_key_is_accepted():
    options = resolve_options("paper")
    cc = options["crosscoder"]
    assert {k: cc[k] for k in FORK} == FORK
    assert cc["shared_decoder"] == "tied" and cc["n_shared"] == int(0.1 * 32 * 768)
    assert set(cc) <= allowed_options()["crosscoder"]
    validate_run_options(options, seed=0, device=torch.device("cpu"))
    # the pipeline puts these into CrossCoderConfig; train_crosscoder takes every other key
    config_keys = {"expansion", "k", "n_shared", "shared_decoder", "dtype"}
    tcfg = TrainingCrossCoderConfig(
        d_model=768, d_sae=32 * 768, k=cc["k"], n_shared=cc["n_shared"], shared_decoder="tied",
        **{k: v for k, v in cc.items() if k in TrainingCrossCoderConfig.__dataclass_fields__
           and k not in config_keys},
    )  # fmt: skip
    assert tcfg.shared_sparsity_coefficient / tcfg.sparsity_coefficient == pytest.approx(0.7)
    args = parse_cli(["train-crosscoder", "--preset", "paper", "--store", "s", "--out", "o"])
    apply_preset(args, "crosscoder", commands.PRESET_DESTS, commands.DEFAULTS)
    assert (args.threshold_schedule, args.b_dec_init, args.batch_size) == (
        "ema",
        "geometric_median",
        2048,
    )


def parse_cli(argv):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_flags_reach_the_crosscoder_and_its_identity(tmp_path, monkeypatch):

    assert set(commands.FORK_OPTIONS) == set(FORK_OPTION_NAMES)
    acts, _ = planted_crosscoder_data(1024, 8, 6, 3, 3, densities=(0.1, 0.3), seed=0)
    monkeypatch.setattr(commands, "_open_store", lambda path: InMemoryStore(acts))
    argv = [
        "train-crosscoder", "--store", "s", "--out", str(tmp_path / "o"), "--d-sae", "32",
        "--k", "2", "--steps", "8", "--batch-size", "64", "--n-shared", "4",
        "--code-normalization", "concat", "--shared-penalty", "sparsity",
        "--threshold-schedule", "ema", "--threshold-start-step", "3", "--aux-loss", "fork",
        "--recon-loss", "l2", "--b-dec-init", "geometric_median", "--lr-warmup-steps", "2",
    ]  # fmt: skip
    args = parse_cli(argv)
    assert args.func(args) == 0
    cc = CrossCoder.load(tmp_path / "o")
    assert (cc.cfg.code_normalization, cc.cfg.shared_penalty) == ("concat", "sparsity")
    record = json.loads((tmp_path / "o" / "training.json").read_text())
    assert record["identity"]["options"]["threshold_schedule"] == "ema"
    assert record["training"]["lr_warmup_steps"] == 2
    with pytest.raises(CrossdiffError, match="other settings"):
        args = parse_cli([*argv[:-2], "--lr-warmup-steps", "3"])
        args.func(args)
