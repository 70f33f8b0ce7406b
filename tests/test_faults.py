"""Environment faults and damaged inputs: each gives a one-line error that names the file, option
or value at fault (never a raw traceback), and none ends in exit 0 with a wrong result."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from planted_store import write_planted_store
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import crossdiff.crosscoder.checkpoint as checkpoint_module
from crossdiff import CrossCoderConfig, diff_features, evaluate_crosscoder, train_crosscoder
from crossdiff.activations import ActivationStore
from crossdiff.activations.store import MANIFEST
from crossdiff.cli import main as cli_main
from crossdiff.crosscoder import CrossCoder
from crossdiff.crosscoder.synthetic import planted_crosscoder_data
from crossdiff.data import DomainSource, hf_corpus
from crossdiff.data.tokens import TokenSet
from crossdiff.plumbing.common import FILE_MODE, CrossdiffError, DiskFullError
from crossdiff.plumbing.integrity import checksum_path

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
REPO = Path(__file__).resolve().parents[1]
D_MODEL = 8
SHARD = 256


def write_store(path: Path, acts: torch.Tensor) -> ActivationStore:
    """A float32 store of `acts` [n, 2, D_MODEL] in shards of SHARD tokens."""
    return write_planted_store(path, acts, shard=SHARD)


def planted(n: int = 1024) -> torch.Tensor:
    acts, _ = planted_crosscoder_data(n, D_MODEL, 6, 3, 3, densities=(0.1, 0.3), seed=0)
    return acts.float()


CFG = CrossCoderConfig(d_model=D_MODEL, d_sae=32, k=2)
TRAIN = dict(steps=40, batch_size=128, log_every=10, prefetch=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(store folder, saved crosscoder folder), the crosscoder trained on the planted store."""
    root = tmp_path_factory.mktemp("trained")
    store = write_store(root / "store", planted())
    cc = train_crosscoder(store, CFG, **TRAIN)
    cc.save(root / "cc")
    return root / "store", root / "cc"


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def nan_into_safetensors(path: Path, key: str | None = None) -> None:
    """Rewrite `path` with NaN in one tensor, as valid safetensors (the checksum file stays)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = key or next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, path, metadata=metadata)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli_main(argv)
    return code, capsys.readouterr().err


# --- weights: checksums and finite checks ------------------------------------------------------


def test_nan_in_a_crosscoder_checkpoint_is_refused_not_resumed(tmp_path):
    store = write_store(tmp_path / "store", planted())
    ckpt = tmp_path / "ckpt"
    train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    state = json.loads((ckpt / "state.json").read_text())
    state_file = ckpt / state["tensors"]
    assert len(state["tensors_sha256"]) == 64
    nan_into_safetensors(state_file, "model.W_enc")
    with pytest.raises(CrossdiffError, match=f"{state_file.name} is damaged.*delete"):
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    # a checkpoint of an older crossdiff (no checksum) with NaN weights: the finite check
    del state["tensors_sha256"]
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CrossdiffError, match=r"non-finite weight: W_enc\[0, 0, 3\] = nan"):
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)


def test_truncated_checkpoint_names_the_file(tmp_path):
    store = write_store(tmp_path / "store", planted())
    ckpt = tmp_path / "ckpt"
    train_crosscoder(
        store, CFG, **(TRAIN | {"steps": 20}), checkpoint_dir=ckpt, checkpoint_every=10
    )
    state_file = next(ckpt.glob("state_*.safetensors"))
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(CrossdiffError, match=f"{state_file.name} is damaged"):
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    state = json.loads((ckpt / "state.json").read_text())
    del state["tensors_sha256"]  # as an older checkpoint: reading it fails, still cleanly
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CrossdiffError, match=f"cannot read the checkpoint .*{state_file.name}"):
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)


def test_a_non_finite_loss_stops_training_with_its_step(monkeypatch):
    from crossdiff.crosscoder.training_sae import TrainingCrossCoder

    real = TrainingCrossCoder.training_forward_pass

    def diverges_at_step_13(self, step_input):
        output = real(self, step_input)
        if step_input.n_training_steps == 13:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(TrainingCrossCoder, "training_forward_pass", diverges_at_step_13)
    with pytest.raises(CrossdiffError, match="loss became non-finite at training step 13"):
        train_crosscoder(planted(), CFG, **TRAIN)


def test_damaged_or_edited_crosscoder_folders_give_clean_errors(trained, tmp_path, capsys):
    store_dir, cc_dir = trained
    # NaN bytes in sae_weights: the checksum says which file; report exits 2, writes nothing
    bad = copy_folder(cc_dir, tmp_path / "nan")
    nan_into_safetensors(bad / "sae_weights.safetensors", "W_enc")
    with pytest.raises(CrossdiffError, match="sae_weights.safetensors is damaged"):
        CrossCoder.load(bad)
    out = tmp_path / "report"
    code, err = run_cli(
        ["report", "--crosscoder", str(bad), "--store", str(store_dir), "--out", str(out)], capsys
    )
    assert code == 2 and "is damaged" in err and "Traceback" not in err
    assert not (out / "report.json").exists()
    # the same without a checksum (an older folder): the finite check refuses it
    checksum_path(bad / "sae_weights.safetensors").unlink()
    with pytest.raises(CrossdiffError, match=r"non-finite weight: W_enc\[0, 0, 3\]"):
        CrossCoder.load(bad)
    # truncated weights
    cut = copy_folder(cc_dir, tmp_path / "cut")
    weights = cut / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CrossdiffError, match="sae_weights.safetensors is damaged"):
        CrossCoder.load(cut)
    checksum_path(weights).unlink()
    with pytest.raises(CrossdiffError, match=f"cannot load the crosscoder in {cut}"):
        CrossCoder.load(cut)
    # an edited cfg.json: d_sae no longer fits the weights; then not JSON at all
    edited = copy_folder(cc_dir, tmp_path / "edited")
    cfg = json.loads((edited / "cfg.json").read_text())
    (edited / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 64}))
    with pytest.raises(CrossdiffError, match="cfg.json and sae_weights.safetensors do not fit"):
        CrossCoder.load(edited)
    (edited / "cfg.json").write_text("{not json")
    with pytest.raises(CrossdiffError, match="cfg.json is not valid JSON"):
        CrossCoder.load(edited)


def test_in_memory_crosscoder_with_nan_weights_is_refused(trained):
    store_dir, cc_dir = trained
    cc = CrossCoder.load(cc_dir)
    with torch.no_grad():
        cc.W_dec_untied[5, 1, 2] = float("inf")
    store = ActivationStore(store_dir)
    with pytest.raises(CrossdiffError, match=r"W_dec_untied\[5, 1, 2\] = inf"):
        evaluate_crosscoder(cc, store)
    with pytest.raises(CrossdiffError, match=r"W_dec_untied\[5, 1, 2\] = inf"):
        diff_features(cc, store, show_progress=False)


def lm_run(out: Path, **options):
    """Both language models, tiny, on random tokens, in this process (2 checkpoints each)."""
    from crossdiff.models import matched_configs, train_language_models

    g = torch.Generator().manual_seed(0)
    sets = []
    for n in (24, 6):
        tokens = torch.randint(1, 40, (n, 12), generator=g)
        sets.append(
            TokenSet(
                tokens=tokens,
                doc_ids=torch.arange(n)[:, None].expand(n, 12).clone(),
                doc_positions=torch.arange(-1, 11)[None].expand(n, 12).clone(),
                domains=torch.arange(n) % 3,
            )
        )
    small = dict(d_model=16, n_heads=2, n_layers=1, d_vocab=40, n_ctx=12, d_mlp=32, device="cpu")
    dense, moe = matched_configs("tiny", **small, num_experts=4)
    kwargs = dict(steps=6, batch_size=4, lr=1e-2, warmup=2, eval_every=100, checkpoint_every=2)
    return train_language_models(
        *sets, out, dense_cfg=dense, moe_cfg=moe, parallel=False, **(kwargs | options)
    )


def test_language_model_training_stops_on_a_non_finite_loss(tmp_path, monkeypatch):
    import crossdiff.models.train as train_module

    real_step, calls = train_module.train_step, []

    def nan_at_the_fourth_step(*args, **kwargs):
        calls.append(1)
        ce, aux = real_step(*args, **kwargs)
        return (float("nan"), aux) if len(calls) == 4 else (ce, aux)

    monkeypatch.setattr(train_module, "train_step", nan_at_the_fourth_step)
    with pytest.raises(
        CrossdiffError, match=r"dense: the loss became non-finite at step 3 .*rows \["
    ):
        lm_run(tmp_path)
    assert not (tmp_path / "dense" / "config.json").exists()


def test_damaged_language_model_checkpoint_is_refused(tmp_path, monkeypatch):
    import crossdiff.models.train as train_module

    real_step, calls = train_module.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after the dense model's step-2 checkpoint
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm_run(tmp_path)
    monkeypatch.setattr(train_module, "train_step", real_step)
    ckpt = tmp_path / "checkpoints" / "dense" / "checkpoint.safetensors"
    nan_into_safetensors(ckpt, "model.embed.W_E")
    with pytest.raises(CrossdiffError, match="checkpoint.safetensors is damaged.*delete"):
        lm_run(tmp_path)
    checksum_path(ckpt).unlink()  # as a checkpoint of an older version: the finite check
    with pytest.raises(CrossdiffError, match=r"non-finite weight: embed.W_E\[0, 3\] = nan"):
        lm_run(tmp_path)


def test_damaged_language_model_weights_are_refused(tmp_path):
    from crossdiff.models import build_model, dense_config, load_model, save_model

    folder = save_model(
        build_model(dense_config("tiny", d_model=16, n_layers=1, d_vocab=50)), tmp_path / "m"
    )
    nan_into_safetensors(folder / "model.safetensors", "embed.W_E")
    with pytest.raises(CrossdiffError, match="model.safetensors is damaged"):
        load_model(folder)
    checksum_path(folder / "model.safetensors").unlink()
    with pytest.raises(CrossdiffError, match=r"non-finite weight: embed.W_E\[0, 3\]"):
        load_model(folder)


# --- activations: NaN in a store -----------------------------------------------------------------


def test_nan_activations_are_refused_with_shard_and_row(trained, tmp_path, capsys):
    _, cc_dir = trained
    acts = planted()
    acts[SHARD + 7, 1, 3] = float("nan")  # shard 1, row 7
    store = write_store(tmp_path / "nan_store", acts)
    where = r"shard_00001.safetensors, row 7, model 1, dimension 3"
    with pytest.raises(CrossdiffError, match=where):
        train_crosscoder(store, CFG, **TRAIN)
    # the crosscoder was trained on another store: allowed here, to reach the NaN check
    with pytest.raises(CrossdiffError, match=where):
        diff_features(CrossCoder.load(cc_dir), store, show_progress=False, allow_mismatch=True)
    with pytest.raises(CrossdiffError, match="non-finite activation"):
        evaluate_crosscoder(CrossCoder.load(cc_dir), store, allow_mismatch=True)
    out = tmp_path / "report"
    argv = ["report", "--crosscoder", str(cc_dir), "--store", str(store.path), "--out", str(out)]
    argv.append("--allow-mismatch")
    code, err = run_cli(argv, capsys)
    assert code == 2 and "shard_00001.safetensors, row 7" in err
    assert not (out / "report.json").exists()


# --- store manifests ------------------------------------------------------------------------------


def test_edited_manifests_are_refused(tmp_path):
    store = write_store(tmp_path / "s", planted(600))
    manifest = json.loads((store.path / MANIFEST).read_text())
    (store.path / MANIFEST).write_text(json.dumps(manifest | {"n_tokens": 10_000}))
    with pytest.raises(CrossdiffError, match="n_tokens=10000 but its shards hold 600"):
        ActivationStore(store.path)
    (store.path / MANIFEST).write_text(json.dumps(manifest | {"d_model": 12}))
    with pytest.raises(CrossdiffError, match="d_model=12 with d_models=.8, 8."):
        ActivationStore(store.path)
    # counts edited consistently: the shard itself disagrees, found when it is opened
    shards = [dict(s) for s in manifest["shards"]]
    shards[-1]["n_tokens"] += 50
    edited = manifest | {"shards": shards, "n_tokens": manifest["n_tokens"] + 50}
    (store.path / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(CrossdiffError, match=r"shard_00002.safetensors .* shape \[88, 2, 8\]"):
        ActivationStore(store.path).read_acts()


# --- token sets carry their tokenizer -------------------------------------------------------------


def test_token_set_keeps_its_tokenizer_fingerprint_and_harvest_checks_it(tmp_path):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from crossdiff.activations import Pairing, harvest

    rows = torch.randint(1, 30, (8, 12))
    tokens = TokenSet(
        tokens=rows,
        doc_ids=torch.zeros_like(rows),
        doc_positions=torch.arange(12).repeat(8, 1),
        domains=torch.zeros(8, dtype=torch.long),
        tokenizer_fingerprint="tok-B",
    )
    loaded = TokenSet.load(tokens.save(tmp_path / "tokens.safetensors"))
    assert loaded.tokenizer_fingerprint == "tok-B"
    assert loaded.subset([0, 1]).tokenizer_fingerprint == "tok-B"
    cfg = dict(n_layers=1, d_model=8, n_ctx=16, d_head=4, n_heads=2, d_mlp=16, d_vocab=40)
    pairing = Pairing(name="r", sites=(("blocks.0.hook_resid_post", "blocks.0.hook_resid_post"),))
    models = [HookedTransformer(HookedTransformerConfig(**cfg, act_fn="gelu")) for _ in range(2)]
    with pytest.raises(CrossdiffError, match="tok-B.*tok-A.*prepared with the models' tokenizer"):
        harvest(
            *models,
            loaded,
            pairing,
            tmp_path / "store",
            tokenizer_fingerprints=("tok-A", "tok-A"),
            progress=False,
        )
    # a set of an older crossdiff (no fingerprint) is harvested as before
    loaded.tokenizer_fingerprint = None
    harvest(
        *models,
        loaded,
        pairing,
        tmp_path / "store",
        tokenizer_fingerprints=("tok-A", "tok-A"),
        progress=False,
    )
    assert ActivationStore(tmp_path / "store").n_tokens > 0


# --- environment: --out, --device, disk, memory, corpus bytes ------------------------------------


def test_unusable_out_and_unknown_device_are_one_line_errors(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, says in ((a_file, "is a file"), (a_file / "run", "lies under")):
        code, err = run_cli(["run", "--preset", "micro", "--out", str(out)], capsys)
        assert code == 2 and says in err and str(out) in err and len(err.splitlines()) == 1
    fresh = tmp_path / "never"
    code, err = run_cli(
        ["run", "--preset", "micro", "--out", str(fresh), "--device", "bogus"], capsys
    )
    assert code == 2 and "unknown device 'bogus'" in err and not fresh.exists()
    from crossdiff.run.pipeline import run_pipeline

    with pytest.raises(CrossdiffError, match="unknown device 'bogus'"):
        run_pipeline(fresh, "micro", device="bogus")
    assert not fresh.exists()
    # a read-only filesystem (simulated: tests may run as root, who may write anywhere)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode)
    )
    code, err = run_cli(["run", "--preset", "micro", "--out", str(tmp_path / "ro")], capsys)
    assert code == 2 and "is not writable" in err and not (tmp_path / "ro").exists()


def test_disk_full_while_writing_a_checkpoint_names_the_file_and_leaves_nothing(
    tmp_path, monkeypatch
):
    store = write_store(tmp_path / "store", planted())

    def full_disk(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(DiskFullError, match=r"disk is full: could not write .*state_000000010"):
        train_crosscoder(store, CFG, **TRAIN, checkpoint_dir=ckpt, checkpoint_every=10)
    assert sorted(p.name for p in ckpt.iterdir()) == []  # no partial or temporary file


def test_disk_full_while_saving_a_crosscoder(trained, tmp_path, monkeypatch):
    _, cc_dir = trained
    cc = CrossCoder.load(cc_dir)

    def full_disk(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CrossCoder, "save_model", full_disk)
    with pytest.raises(DiskFullError, match=r"sae_weights.safetensors \(it needs about"):
        cc.save(tmp_path / "cc")
    assert list((tmp_path / "cc").iterdir()) == []


def test_out_of_memory_d_sae_says_the_size():
    with pytest.raises(CrossdiffError, match=r"not enough memory for a crosscoder with d_sae="):
        train_crosscoder(planted(), CrossCoderConfig(d_model=D_MODEL, d_sae=10**11, k=2), **TRAIN)


def test_undecodable_corpus_bytes_name_the_file_and_offset(tmp_path):
    good = json.dumps({"text": "fine " * 30}) + "\n"
    data = good.encode() + b'{"text": "bad \xff\xfe bytes ' + b"y" * 80 + b'"}\n' + good.encode()
    path = tmp_path / "stories.jsonl"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    source = DomainSource("stories", "json", data_files=str(path), column="text")
    with pytest.raises(CrossdiffError, match=f"stories.jsonl .* byte {offset} .*encoding_errors"):
        list(hf_corpus([source], shuffle_buffer=0))
    replaced = DomainSource(
        "stories", "json", data_files=str(path), column="text", encoding_errors="replace"
    )
    docs = list(hf_corpus([replaced], shuffle_buffer=0))
    assert len(docs) == 3 and "\ufffd" in docs[1].text
    text = tmp_path / "plain.txt"
    text.write_bytes(b"one line\nsecond \xc3( line\n")
    with pytest.raises(CrossdiffError, match="plain.txt .* byte 16"):
        list(hf_corpus([DomainSource("code", "text", data_files=str(text))], shuffle_buffer=0))


# --- files and processes --------------------------------------------------------------------------


def test_every_written_file_has_the_umask_mode(trained, tmp_path):
    store_dir, cc_dir = trained
    from crossdiff.models import build_model, dense_config, save_model

    save_model(
        build_model(dense_config("tiny", d_model=16, n_layers=1, d_vocab=50)), tmp_path / "m"
    )
    TokenSet(
        tokens=torch.zeros(2, 4, dtype=torch.long),
        doc_ids=torch.zeros(2, 4, dtype=torch.long),
        doc_positions=torch.zeros(2, 4, dtype=torch.long),
        domains=torch.zeros(2, dtype=torch.long),
    ).save(tmp_path / "t.safetensors")
    files = [p for d in (cc_dir, store_dir, tmp_path) for p in d.rglob("*") if p.is_file()]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert "sae_weights.safetensors" in modes and "model.safetensors" in modes
    assert set(modes.values()) == {oct(FILE_MODE)}, modes


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_language_model_workers_die_with_the_run(tmp_path, sig):
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossdiff", "run", "--preset", "micro", "--out",
         str(tmp_path / "run"), "--device", "cpu"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[int] = []
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        workers = [
            p
            for p in _children(proc.pid)
            if b"crossdiff.models.worker" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        if len(workers) == 2:
            break
        time.sleep(0.05)
    if len(workers) < 2:
        proc.kill()
        pytest.skip("the models stage did not start two workers (one core, or it finished)")
    time.sleep(1.0)  # let the workers get past their start-up
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.05)
    assert not [p for p in workers if _alive(p)], f"workers {workers} outlived the run"
