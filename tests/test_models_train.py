"""The language-model trainer on a planted Markov source: both models beat the unigram baseline,
see the same batches, resume exactly, and refuse checkpoints from other settings."""

import json
import math

import pytest
import torch

import crossdiff.models.train as train_module
from crossdiff.data import TokenSet
from crossdiff.models import load_model, matched_configs, train_language_models
from crossdiff.models.evaluate import unigram_cross_entropy
from crossdiff.models.io import read_model_header
from crossdiff.models.train import TrainOptions, batch_rows, learning_rate
from crossdiff.plumbing.common import CrossdiffError

VOCAB, SEQ = 48, 16
SMALL = dict(d_model=32, n_heads=2, n_layers=2, d_vocab=VOCAB, n_ctx=SEQ, device="cpu")


def markov_token_set(rows_per_domain: int, seed: int) -> TokenSet:
    """Each domain follows its own near-deterministic successor rule (next = a*t + b mod V-1,
    shifted past BOS) 90% of the time: unigram ~ uniform (~3.8 nats), bigram ~0.7 nats."""
    g = torch.Generator().manual_seed(seed)
    rules = [(5, 1), (7, 3), (11, 2)]
    rows, domains = [], []
    for domain, (a, b) in enumerate(rules):
        for _ in range(rows_per_domain):
            t = int(torch.randint(1, VOCAB, (1,), generator=g))
            row = [0]  # BOS
            for _ in range(SEQ - 1):
                row.append(t)
                if torch.rand((), generator=g) < 0.9:
                    t = 1 + (a * t + b) % (VOCAB - 1)
                else:
                    t = int(torch.randint(1, VOCAB, (1,), generator=g))
            rows.append(row)
            domains.append(domain)
    tokens = torch.tensor(rows)
    n = len(rows)
    return TokenSet(
        tokens=tokens,
        doc_ids=torch.arange(n)[:, None].expand(n, SEQ).clone(),
        doc_positions=torch.arange(-1, SEQ - 1)[None].expand(n, SEQ).clone(),
        domains=torch.tensor(domains),
    )


class FakeTokenizer:
    vocab_size = VOCAB

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text("{}")
        return directory


@pytest.fixture(scope="module")
def data():
    return markov_token_set(40, seed=0), markov_token_set(6, seed=1)


@pytest.fixture(scope="module")
def cfgs():
    return matched_configs("tiny", **SMALL, d_mlp=64, num_experts=4)


def run(tmp_path, data, cfgs, **options):
    dense, moe = cfgs
    kwargs = dict(
        steps=6, batch_size=4, lr=1e-2, warmup=2, eval_every=100, checkpoint_every=2, parallel=False
    )
    return train_language_models(
        data[0], data[1], tmp_path, dense_cfg=dense, moe_cfg=moe, **(kwargs | options)
    )


@pytest.mark.slow  # 7-9 s of training
def test_both_models_learn_the_source_and_eval_json_reports_it(tmp_path, data, cfgs):
    result = run(
        tmp_path, data, cfgs, steps=120, batch_size=8, warmup=10, tokenizer=FakeTokenizer()
    )
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report == json.loads(json.dumps(result.eval))
    for name in ("dense", "moe"):
        entry = report["models"][name]
        assert set(entry["domains"]) == {"code", "science", "stories"}
        for v in entry["domains"].values():
            assert v["unigram_cross_entropy"] > 3.0  # the planted source is near-uniform
            assert v["gap"] == pytest.approx(v["unigram_cross_entropy"] - v["cross_entropy"])
            assert v["gap"] >= 1.0
        assert entry["meets_target"]
    load = report["models"]["moe"]["expert_load"]
    assert len(load["fractions"]) == 2 and all(len(r) == 4 for r in load["fractions"])
    assert all(sum(r) == pytest.approx(1.0) for r in load["fractions"])
    assert load["bounds"] == [0.25 / 4, 4 / 4]
    assert load["balanced"] == (load["min"] >= 0.0625 and load["max"] <= 1.0)
    assert "expert_load" not in report["models"]["dense"]
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert not (tmp_path / "checkpoints" / "dense").exists()  # removed once complete
    tokens = data[1].tokens[:2]
    torch.testing.assert_close(load_model(tmp_path / "moe")(tokens), result.moe(tokens))


def test_both_models_see_the_same_batches_in_the_same_order(tmp_path, data, cfgs, monkeypatch):
    seen = []
    real_step = train_module.train_step

    def recording_step(model, optimizer, tokens, lr, grad_clip, **kwargs):
        seen.append((model.cfg.num_experts, tokens.clone(), lr))
        return real_step(model, optimizer, tokens, lr, grad_clip, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording_step)
    run(tmp_path, data, cfgs, steps=5)
    dense = [(t, lr) for e, t, lr in seen if e is None]
    moe = [(t, lr) for e, t, lr in seen if e == 4]
    assert len(dense) == len(moe) == 5
    for (a, lr_a), (b, lr_b) in zip(dense, moe, strict=True):
        assert torch.equal(a, b) and lr_a == lr_b
    assert not torch.equal(dense[0][0], dense[1][0])


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, data, cfgs, monkeypatch):
    straight = run(tmp_path / "straight", data, cfgs)

    calls = []
    real_step = train_module.train_step

    def interrupting_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # dense done (6 steps); MoE interrupted in step 4, checkpoint at 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", data, cfgs)
    assert (tmp_path / "resumed" / "dense" / "config.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "moe" / "checkpoint.safetensors").exists()

    calls.clear()
    resumed = run(tmp_path / "resumed", data, cfgs)
    assert len(calls) == 4  # dense skipped, MoE continued from its step-2 checkpoint
    for name in ("dense", "moe"):
        a = getattr(straight, name).state_dict()
        b = getattr(resumed, name).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    assert straight.eval["models"] == resumed.eval["models"]


@pytest.mark.slow  # spawns two Python processes that import torch and TransformerLens
def test_two_process_training_gives_the_same_models(tmp_path, data, cfgs):
    sequential = run(tmp_path / "one", data, cfgs, steps=3, threads=1)
    parallel = run(tmp_path / "two", data, cfgs, steps=3, threads=1, parallel=True)
    for name in ("dense", "moe"):
        a = getattr(sequential, name).state_dict()
        b = getattr(parallel, name).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    assert not (tmp_path / "two" / "checkpoints" / "train_tokens.safetensors").exists()


def test_other_settings_are_refused_not_overwritten(tmp_path, data, cfgs, monkeypatch):
    run(tmp_path / "done", data, cfgs, steps=2)
    with pytest.raises(CrossdiffError, match="trained with other settings"):
        run(tmp_path / "done", data, cfgs, steps=2, lr=5e-3)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    real_step = train_module.train_step
    calls = []

    def step_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            interrupt()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "partial", data, cfgs)  # dense checkpoint at step 2
    monkeypatch.setattr(train_module, "train_step", real_step)
    with pytest.raises(CrossdiffError, match="checkpoint in .* comes from another config"):
        run(tmp_path / "partial", data, cfgs, steps=8)


def test_data_that_does_not_fit_the_models_is_explained(tmp_path, data, cfgs):
    train, heldout = data
    with pytest.raises(CrossdiffError, match="d_vocab is 48"):
        big = TokenSet(train.tokens + 100, train.doc_ids, train.doc_positions, train.domains)
        run(tmp_path, (big, heldout), cfgs)
    with pytest.raises(CrossdiffError, match="n_ctx is 16"):
        long = markov_token_set(2, 0)
        wide = TokenSet(
            torch.cat([long.tokens, long.tokens], 1),
            torch.cat([long.doc_ids, long.doc_ids], 1),
            torch.cat([long.doc_positions, long.doc_positions], 1),
            long.domains,
        )
        run(tmp_path, (wide, heldout), cfgs)
    with pytest.raises(CrossdiffError, match="training token set is empty"):
        run(tmp_path, (train.subset(slice(0, 0)), heldout), cfgs)
    with pytest.raises(CrossdiffError, match="unknown model preset"):
        train_language_models(train, heldout, tmp_path, preset="medium")


def test_batches_cover_every_row_once_per_epoch():
    n, b = 10, 4
    first_epochs = torch.cat([batch_rows(s, b, n, seed=3) for s in range(5)])  # 20 = 2 epochs
    assert sorted(first_epochs[:10].tolist()) == list(range(10))
    assert sorted(first_epochs[10:].tolist()) == list(range(10))
    assert not torch.equal(first_epochs[:10], first_epochs[10:])
    assert torch.equal(batch_rows(2, b, n, seed=3), batch_rows(2, b, n, seed=3))
    assert not torch.equal(batch_rows(0, b, n, seed=3), batch_rows(0, b, n, seed=4))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    opts = TrainOptions(steps=110, batch_size=1, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(0, opts) == pytest.approx(0.1)
    assert learning_rate(9, opts) == pytest.approx(1.0)
    assert learning_rate(60, opts) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(110, opts) == pytest.approx(0.1)
    rates = [learning_rate(s, opts) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_unigram_baseline_is_add_one_smoothed_on_train_tokens():
    ts = markov_token_set(3, 0)
    train = TokenSet(torch.full_like(ts.tokens, 5), ts.doc_ids, ts.doc_positions, ts.domains)
    n_per_domain = 3 * (SEQ - 1)
    result = unigram_cross_entropy(train, train, d_vocab=VOCAB)
    expected = -math.log((n_per_domain + 1) / (n_per_domain + VOCAB))
    assert result == {d: pytest.approx(expected) for d in ("code", "science", "stories")}


def test_bfloat16_autocast_trains_with_float32_weights(tmp_path, data, cfgs):
    plain = run(tmp_path / "fp32", data, cfgs, steps=8, batch_size=8)
    mixed = run(tmp_path / "bf16", data, cfgs, steps=8, batch_size=8, autocast=True)
    for name in ("dense", "moe"):
        model = getattr(mixed, name)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        curves = [
            torch.tensor(read_model_header(tmp_path / run_dir / name)["training"]["loss_curve"])
            for run_dir in ("fp32", "bf16")
        ]
        # bfloat16 keeps ~3 significant digits: the same run, not the same bits
        assert not torch.equal(curves[0], curves[1])
        torch.testing.assert_close(curves[1][:, 0], curves[0][:, 0], atol=0.05, rtol=0)
    assert plain.eval["training"]["autocast"] is False and mixed.eval["training"]["autocast"]


def test_each_model_gets_one_progress_bar_with_its_eval_lines_above_it(
    tmp_path, data, cfgs, monkeypatch
):
    bars, lines = [], []
    real_tqdm = train_module.tqdm

    class RecordingBar(real_tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, **kwargs | {"disable": True})

        @classmethod
        def write(cls, text, *args, **kwargs):
            lines.append(text)

    monkeypatch.setattr(train_module, "tqdm", RecordingBar)
    run(tmp_path, data, cfgs, steps=4, eval_every=2)
    assert [(b["desc"], b["total"], b["unit"]) for b in bars] == [
        ("train dense", 4, "step"),
        ("train moe", 4, "step"),
    ]
    assert all("disable" not in b for b in bars)  # rank 0 draws it, in a log file too
    assert [line.split(":")[0] for line in lines] == [
        "dense step 2",
        "dense step 4",
        "moe step 2",
        "moe step 4",
    ]
