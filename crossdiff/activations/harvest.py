"""Paired harvesting: run two models on identical token batches and stream their activations
at the pairing's hook points into an ActivationStore."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.model_bridge import TransformerBridge

from crossdiff.activations.pairing import Pairing, hook_layer, load_pairing
from crossdiff.activations.store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ActivationStore,
    StoreWriter,
    expert_column_map,
)
from crossdiff.common import (
    CrossdiffError,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from crossdiff.data.tokens import TokenSet
from crossdiff.distributed import dist_info
from crossdiff.lock import folder_lock

# the models a harvest runs: anything TransformerLens runs with named hook points
LensModel = HookedTransformer | TransformerBridge

SHARD_BYTES = 64 * 2**20
# manifest keys that must match for a harvest to continue an existing store
_COMPATIBLE_KEYS = (
    "model_names",
    "models",
    "hook_points",
    "pairing",
    "dtype",
    "d_models",
    "experts",
    "split",
)
# what a harvest writes into its folder: shards and statistics (and their temporary files) ...
_STORE_FILE_RE = re.compile(r"^\.?(shard|stats)_\d{5}\.safetensors")
# ... and, harvested by N processes, the ranks' own stores ranks-of-N/rank_R/ with plan.json
RANKS_DIR_RE = re.compile(r"^ranks-of-(\d+)$")
PLAN = "plan.json"


@dataclass
class _Tokens:
    """Token rows with per-token metadata and the mask of positions to keep."""

    tokens: Tensor  # [n_seq, seq_len]
    doc_ids: Tensor
    positions: Tensor
    domains: Tensor  # [n_seq]
    domain_names: tuple[str, ...]
    keep: Tensor  # [n_seq, seq_len] bool

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(str(tuple(self.tokens.shape)).encode())
        for rows in self.tokens.split(1 << 16):
            digest.update(rows.to(torch.int32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]


def _as_tokens(token_set: TokenSet | Tensor, drop_bos: bool) -> _Tokens:
    if isinstance(token_set, TokenSet):
        tokens, doc_ids = token_set.tokens.long(), token_set.doc_ids.long()
        positions, domains = token_set.doc_positions.long(), token_set.domains.long()
        names = tuple(token_set.domain_names)
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if drop_bos:
            keep[:, 0] = False
            keep &= positions != -1
    elif isinstance(token_set, Tensor):
        _check_token_tensor(token_set)
        tokens = token_set.long().cpu()
        n_seq, seq_len = tokens.shape
        doc_ids = torch.arange(n_seq).unsqueeze(1).expand(n_seq, seq_len)
        positions = torch.arange(seq_len).unsqueeze(0).expand(n_seq, seq_len)
        domains, names = torch.full((n_seq,), -1, dtype=torch.long), ()
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if drop_bos:
            keep[:, 0] = False
    else:
        raise CrossdiffError(
            f"token_set must be a crossdiff TokenSet or a LongTensor, "
            f"got {type(token_set).__name__}"
        )
    if tokens.numel() == 0:
        raise CrossdiffError("the token set is empty; build one with crossdiff.build_token_set")
    if len(tokens) and int(tokens.min()) < 0:
        raise CrossdiffError(f"token ids must be >= 0, found {int(tokens.min())}")
    return _Tokens(tokens, doc_ids, positions, domains, names, keep)


def _check_token_tensor(tokens: Tensor) -> None:
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.is_complex():
        raise CrossdiffError(
            f"tokens must be an integer tensor [n_seq, seq_len], got {tokens.dtype} of "
            f"shape {tuple(tokens.shape)}; pass a TokenSet or a LongTensor of token ids"
        )


def tokens_with_domains(
    tokens: Int[Tensor, "n_seq seq_len"],
    domains: Tensor | Sequence[int],
    domain_names: Sequence[str] | None = None,
) -> TokenSet:
    """A plain token tensor and one domain per row as a TokenSet: each row is one document
    (doc_ids = row index, positions = column index, as harvest records a plain tensor), its
    domain `domain_names[domains[row]]`, and -1 for a row of no domain. Names default to
    domain_0, domain_1, ..."""
    _check_token_tensor(tokens)
    n_seq, seq_len = tokens.shape
    rows = torch.as_tensor(domains)
    if rows.dtype.is_floating_point or rows.is_complex() or tuple(rows.shape) != (n_seq,):
        raise CrossdiffError(
            f"domains must be one integer per row of the tokens, shape ({n_seq},), got "
            f"{rows.dtype} of shape {tuple(rows.shape)}; a row is one document and has one "
            "domain (-1 for none)"
        )
    rows = rows.long().cpu()
    top = int(rows.max()) if n_seq else -1
    names = (
        tuple(f"domain_{i}" for i in range(top + 1))
        if domain_names is None
        else tuple(str(n) for n in domain_names)
    )
    if len(set(names)) != len(names):
        raise CrossdiffError(f"domain_names must be different names, got {list(names)}")
    if n_seq and (int(rows.min()) < -1 or top >= len(names)):
        raise CrossdiffError(
            f"domains must lie in -1..{len(names) - 1} (an index into domain_names {list(names)},"
            f" or -1 for none), got {int(rows.min())}..{top}"
        )
    return TokenSet(
        tokens=tokens.long().cpu(),
        doc_ids=torch.arange(n_seq).unsqueeze(1).expand(n_seq, seq_len).clone(),
        doc_positions=torch.arange(seq_len).unsqueeze(0).expand(n_seq, seq_len).clone(),
        domains=rows,
        domain_names=names,
    )


def heldout_documents(
    doc_ids: Int[Tensor, "n_seq seq_len"], keep: Tensor, fraction: float, seed: int
) -> Int[Tensor, " n_heldout"]:
    """The held-out documents of a token set: a seeded choice of round(fraction * n) of its n
    documents (at least one when fraction > 0 and n >= 2, never all), sorted. It depends on the
    whole token set, not on how many tokens are harvested, so extending a harvest keeps it."""
    if not 0.0 <= fraction <= 0.5:
        raise CrossdiffError(
            f"heldout_fraction must be in [0, 0.5], got {fraction}; the default is 0.1 (0 keeps "
            "every token for training, and evaluation then reads training tokens)"
        )
    docs = torch.unique(doc_ids[keep])
    n_heldout = 0
    if fraction > 0 and len(docs) >= 2:
        n_heldout = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(int(seed)))
    return docs[order[:n_heldout]].sort().values


def config_hash(model: LensModel) -> str:
    fields = {k: v for k, v in model.cfg.to_dict().items() if k not in ("device", "n_devices")}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_hash(model: LensModel) -> str:
    """A hash of every parameter and buffer, so a resume with other weights is refused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def _vocab_fingerprint(model: LensModel) -> str | None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    if getattr(tokenizer, "fingerprint", None):
        return str(tokenizer.fingerprint)
    if hasattr(tokenizer, "get_vocab"):
        vocab = sorted(tokenizer.get_vocab().items())
        return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:32]
    return None


def _check_tokenizers(
    models: tuple[LensModel, LensModel],
    names: tuple[str, str],
    fingerprints: tuple[str | None, str | None] | None,
    tokens: Tensor,
    token_fingerprint: str | None = None,
) -> None:
    vocab = [m.cfg.d_vocab for m in models]
    if vocab[0] != vocab[1]:
        raise CrossdiffError(
            f"the models have different vocabularies: {names[0]} has d_vocab={vocab[0]}, "
            f"{names[1]} has d_vocab={vocab[1]}. Paired harvesting needs two models that share a "
            "tokenizer; train or load both with the same one"
        )
    given = fingerprints or (None, None)
    prints = [given[i] or _vocab_fingerprint(models[i]) for i in range(2)]
    if prints[0] and prints[1] and prints[0] != prints[1]:
        raise CrossdiffError(
            f"the models' tokenizers differ: {names[0]} has fingerprint {prints[0]}, {names[1]} "
            f"has {prints[1]}. The same token ids would mean different text to them; use two "
            "models trained with the same tokenizer"
        )
    model_print = prints[0] or prints[1]
    if token_fingerprint and model_print and token_fingerprint != model_print:
        raise CrossdiffError(
            f"the token set was made with another tokenizer (fingerprint {token_fingerprint}) "
            f"than the models' (fingerprint {model_print}): its ids would mean other text to "
            "them. Use the token set prepared with the models' tokenizer (the data folder the "
            "models were trained from), or prepare-data again with --tokenizer set to it"
        )
    if int(tokens.max()) >= vocab[0]:
        raise CrossdiffError(
            f"the token set has id {int(tokens.max())} but the models' vocabulary has only "
            f"{vocab[0]} ids; was it tokenized with another tokenizer?"
        )


def _check_hooks(model: LensModel, name: str, hooks: tuple[str, ...]) -> None:
    """Every hook is found by the name asked for: a HookedTransformer's own names, and on a
    TransformerBridge its aliases too (`blocks.1.hook_resid_post` for `blocks.1.hook_out`)."""
    known = model.hook_dict  # a property that a TransformerBridge rebuilds on each read
    for hook in hooks:
        if hook not in known:
            close = difflib.get_close_matches(hook, list(known), n=5, cutoff=0.6)
            hint = f"close matches: {close}" if close else "list them with `list(model.hook_dict)`"
            raise CrossdiffError(
                f"model {name!r} has no hook point {hook!r} ({hint}); fix the pairing or pass "
                "another one (see docs/pairing-presets.md)"
            )


def _stop_layer(model: LensModel, hooks: tuple[str, ...]) -> int | None:
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    return min(max(layers) + 1, model.cfg.n_layers)  # type: ignore[type-var]


def _expert_slot(pairing: Pairing, models: tuple[LensModel, ...]) -> int | None:
    if not pairing.expert_indices:
        return None
    has = [all(h in m.hook_dict for h in pairing.expert_indices) for m in models]
    if pairing.expert_model in ("a", "b"):
        slot = "ab".index(pairing.expert_model)
        return slot if has[slot] else None
    return 1 if has[1] else (0 if has[0] else None)


def _expert_layout(runner: _PairRunner, models: tuple[LensModel, ...]) -> list[dict]:
    """Which columns of the experts row each expert hook wrote (after the width probe)."""
    if runner.expert_slot is None:
        return []
    n_experts = getattr(models[runner.expert_slot].cfg, "num_experts", None)
    return expert_column_map(runner.expert_hooks, runner.expert_top_k, n_experts)


def _incompatible_keys(manifest: dict[str, Any], header: dict[str, Any]) -> list[str]:
    """The _COMPATIBLE_KEYS where a store and a new harvest differ. A store written before
    `experts.layout` existed continues when its expert hooks and width are the same."""
    differ = []
    for key in _COMPATIBLE_KEYS:
        stored, new = manifest.get(key), header.get(key)
        old_experts = key == "experts" and isinstance(stored, dict) and "layout" not in stored
        if old_experts and isinstance(new, dict):
            new = {k: v for k, v in new.items() if k != "layout"}
        if stored != new:
            differ.append(key)
    return differ


def _did_not_fire(hook: str, name: str) -> str:
    return (
        f"hook {hook!r} of model {name!r} did not fire during the forward: it exists but the "
        "model does not compute it as configured (e.g. attn.hook_result needs "
        "model.set_use_attn_result(True), split-QKV hooks model.set_use_split_qkv_input(True)); "
        "enable it on the model or pair another hook"
    )


class _PairRunner:
    """Runs both models on a batch and returns their activations and the recorded experts."""

    def __init__(
        self,
        models: tuple[LensModel, LensModel],
        names: tuple[str, str],
        pairing: Pairing,
        expert_slot: int | None,
    ) -> None:
        self.models, self.names = models, names
        self.hooks = (pairing.hooks_a, pairing.hooks_b)
        self.expert_hooks = pairing.expert_indices if expert_slot is not None else ()
        self.expert_slot = expert_slot
        self.expert_top_k: list[int] = []  # columns per expert hook, set by run()
        self.captured: list[dict[str, Tensor]] = [{}, {}]
        self.stops = []
        self.model_dtype = torch.float32  # the forward passes' precision (autocast below it)
        for slot, model in enumerate(models):
            names_read = self._read_by(slot)
            self.stops.append(_stop_layer(model, names_read))

    def _read_by(self, slot: int) -> tuple[str, ...]:
        extra = self.expert_hooks if slot == self.expert_slot else ()
        return tuple(dict.fromkeys(self.hooks[slot] + extra))

    def install(self, stack: ExitStack) -> None:
        for slot, model in enumerate(self.models):
            store = self.captured[slot]

            def saver(requested: str, store: dict[str, Tensor] = store) -> Any:
                # kept under the name the pairing asked for: a TransformerBridge calls the hook
                # with its canonical name (blocks.1.hook_out for blocks.1.hook_resid_post)
                def save(tensor: Tensor, hook: Any) -> None:
                    store[requested] = tensor.detach()

                return save

            hooks = [(name, saver(name)) for name in self._read_by(slot)]
            stack.enter_context(model.hooks(fwd_hooks=hooks))

    def _forward(self, slot: int, tokens: Tensor) -> None:
        """One forward pass up to the deepest block read. A model that cannot stop early (a
        TransformerBridge over blocks not named `blocks`) runs the full pass from then on."""
        model = self.models[slot]
        device = next(model.parameters()).device
        if self.stops[slot] is not None:
            try:
                model(tokens.to(device), return_type=None, stop_at_layer=self.stops[slot])
                return
            except NotImplementedError:
                self.stops[slot] = None
                self.captured[slot].clear()
        model(tokens.to(device), return_type=None)

    def run(
        self, tokens: Int[Tensor, "batch pos"], first_row: int
    ) -> tuple[list[Tensor], Tensor | None]:
        batch, pos = tokens.shape
        acts: list[Tensor] = []
        experts = None
        for slot in range(len(self.models)):
            self.captured[slot].clear()
            model = self.models[slot]
            device = next(model.parameters()).device
            autocast = self.model_dtype != torch.float32
            with torch.autocast(device.type, dtype=self.model_dtype, enabled=autocast):
                self._forward(slot, tokens)
            parts = []
            for hook in self.hooks[slot]:
                parts.append(self._checked(slot, hook, batch, pos, first_row))
            acts.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))
            if slot == self.expert_slot:
                per_hook = [self._experts(slot, hook, batch, pos) for hook in self.expert_hooks]
                self.expert_top_k = [x.shape[-1] for x in per_hook]
                experts = torch.cat(per_hook, dim=-1)
        return acts, experts

    def _checked(self, slot: int, hook: str, batch: int, pos: int, first_row: int) -> Tensor:
        x = self.captured[slot].get(hook)
        name = self.names[slot]
        if x is None:
            raise CrossdiffError(_did_not_fire(hook, name))
        if x.ndim != 3 or tuple(x.shape[:2]) != (batch, pos):
            raise CrossdiffError(
                f"hook {hook!r} of model {name!r} outputs shape {tuple(x.shape)}, but a paired "
                f"site must be [batch, pos, d] (here [{batch}, {pos}, d]). Pick a hook with one "
                "vector per token, e.g. hook_resid_post, hook_mlp_out or attn hook_result"
            )
        if not torch.isfinite(x).all():
            raise CrossdiffError(
                f"model {name!r} produced NaN or Inf activations at hook {hook!r} in the batch of "
                f"rows {first_row}..{first_row + batch - 1}; check the model's weights and dtype "
                "(float16 models overflow easily: try --dtype float32)"
            )
        return x

    def _experts(self, slot: int, hook: str, batch: int, pos: int) -> Tensor:
        x = self.captured[slot].get(hook)
        name = self.names[slot]
        if x is None:
            raise CrossdiffError(_did_not_fire(hook, name))
        if x.ndim == 2 and x.shape[0] == batch * pos:  # stock TransformerLens MoE: [batch*pos, k]
            x = x.reshape(batch, pos, -1)
        if x.ndim != 3 or tuple(x.shape[:2]) != (batch, pos):
            raise CrossdiffError(
                f"expert hook {hook!r} of model {name!r} outputs shape {tuple(x.shape)}; "
                "expected [batch, pos, top_k] or [batch*pos, top_k]"
            )
        return x.long()


def _model_dtype(
    model_dtype: str | torch.dtype | None, models: tuple[LensModel, ...]
) -> torch.dtype:
    """The forward passes' precision: as asked, else bfloat16 when a model is on CUDA."""
    if model_dtype is not None:
        dtype = resolve_dtype(model_dtype)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise CrossdiffError(
                f"model_dtype={model_dtype!r}; expected float32, bfloat16 or float16"
            )
        return dtype
    on_cuda = any(next(m.parameters()).device.type == "cuda" for m in models)
    return torch.bfloat16 if on_cuda else torch.float32


def _tokenizer_info(
    tokenizer: Any,
    models: tuple[LensModel, ...],
    fingerprints: Any,
    token_set_fingerprint: str | None = None,
) -> dict[str, Any]:
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None and fingerprints:
        fingerprint = fingerprints[0] or fingerprints[1]
    if fingerprint is None:
        fingerprint = _vocab_fingerprint(models[0])
    if fingerprint is None:  # the token set's (checked against the models' when they have one)
        fingerprint = token_set_fingerprint
    return {
        "name": getattr(tokenizer, "name", None) or models[0].cfg.tokenizer_name,
        "fingerprint": fingerprint,
        "vocab_size": int(models[0].cfg.d_vocab),
    }


@contextmanager
def _eval_mode(models: tuple[LensModel, ...]) -> Iterator[None]:
    """Harvest in eval mode (no dropout or router noise), then give the models back as they were."""
    training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(models, training, strict=True):
            m.train(was_training)


def _probe_widths(runner: _PairRunner, tokens: Tensor) -> tuple[list[int], int]:
    with ExitStack() as stack:
        runner.install(stack)
        acts, experts = runner.run(tokens[:1], 0)
    return [a.shape[-1] for a in acts], (experts.shape[-1] if experts is not None else 0)


def _is_store_entry(p: Path) -> bool:
    """A file or folder a harvest writes into its store folder (so may remove or reuse)."""
    if p.is_dir():
        return bool(RANKS_DIR_RE.match(p.name))
    return p.name == MANIFEST or bool(_STORE_FILE_RE.match(p.name))


def _clear_store(out_dir: Path) -> None:
    """Remove a store (manifest, shards, statistics, rank sub-stores) from `out_dir`."""
    for p in out_dir.iterdir():
        if _is_store_entry(p):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def _rank_folders(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and RANKS_DIR_RE.match(p.name))


def _check_empty(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CrossdiffError(f"{out_dir} is a file; choose a folder for the store")
    others = [p for p in out_dir.iterdir() if not p.name.startswith(".") and not _is_store_entry(p)]
    if others:
        raise CrossdiffError(
            f"{out_dir} is not empty and holds no activation store; choose an empty or new "
            "folder for the store"
        )


def _open_store(
    out_dir: Path, header: dict[str, Any], segment: dict[str, Any], resume: bool
) -> StoreWriter:
    if not resume and ((out_dir / MANIFEST).exists() or _rank_folders(out_dir)):
        _clear_store(out_dir)
        print(f"resume=False: removed the existing store in {out_dir}")
    if not (out_dir / MANIFEST).exists():
        unfinished = _rank_folders(out_dir)
        if unfinished:
            n = RANKS_DIR_RE.match(unfinished[0].name).group(1)  # type: ignore[union-attr]
            raise CrossdiffError(
                f"{out_dir} holds an unfinished harvest by {n} processes ({unfinished[0].name}/, "
                f"not merged into a store yet); finish it with the same command under `torchrun "
                f"--nproc_per_node {n}`, or pass resume=False (--no-resume) to replace it"
            )
        if out_dir.exists() and any(not p.name.startswith(".") for p in out_dir.iterdir()):
            raise CrossdiffError(
                f"{out_dir} is not empty and holds no activation store; choose an empty or new "
                "folder for the store"
            )
        return StoreWriter.create(out_dir, dict(header, segments=[dict(segment, n_tokens=0)]))
    writer = StoreWriter.reopen(out_dir)
    differ = _incompatible_keys(writer.manifest, header)
    if differ:
        raise CrossdiffError(
            f"{out_dir} already holds a store harvested with different {differ}; harvest into a "
            "new --out folder, or pass resume=False to replace it"
        )
    segments = writer.manifest["segments"]
    same = [i for i, s in enumerate(segments) if s["token_set"] == segment["token_set"]]
    if same and same[-1] != len(segments) - 1:
        raise CrossdiffError(
            f"the store in {out_dir} already has tokens of this token set (segment {same[-1]}), "
            "and others were appended after it; harvesting it again would duplicate tokens"
        )
    if not same:
        if writer.manifest["domain_names"] != header["domain_names"]:
            raise CrossdiffError(
                f"cannot append: the store has domains {writer.manifest['domain_names']}, this "
                f"token set has {header['domain_names']}"
            )
        writer.manifest["segments"] = [
            *segments,
            dict(segment, start=writer.n_tokens, n_tokens=0),
        ]
    return writer


def harvest(
    model_a: LensModel,
    model_b: LensModel,
    token_set: TokenSet | Tensor,
    pairing: Pairing | str | Path,
    out_dir: str | Path,
    *,
    n_tokens: int | None = None,
    batch_size: int = 32,
    dtype: str | torch.dtype = "float16",
    shard_tokens: int | None = None,
    model_names: tuple[str, str] = ("A", "B"),
    device: str | torch.device | None = None,
    resume: bool = True,
    tokenizer: Any = None,
    tokenizer_fingerprints: tuple[str | None, str | None] | None = None,
    progress: bool = True,
    distributed: bool | None = None,
    heldout_fraction: float = 0.1,
    split_seed: int = 0,
    domains: Tensor | Sequence[int] | None = None,
    domain_names: Sequence[str] | None = None,
    model_dtype: str | torch.dtype | None = None,
) -> ActivationStore:
    """Record both models' activations at the pairing's hook points into a store at `out_dir`.

    `model_a` and `model_b` are TransformerLens models: `HookedTransformer`s or
    `TransformerBridge`s (a Bridge's hook aliases such as `blocks.1.hook_resid_post` work). Each
    runs up to the deepest block the pairing reads. `token_set` is a crossdiff TokenSet or a
    plain integer tensor [n_seq, seq_len], whose rows are then its documents; give such a tensor
    one domain per row with `domains` (and `domain_names`), or none (the store then records no
    domains). `model_names` name the two models in the store, the report and every message.

    The tokens of `heldout_fraction` of the token set's documents (chosen by `split_seed`, see
    heldout_documents) form the store's held-out part, which crosscoder training never reads
    and evaluation does; a document is never in both parts. The statistics and scaling factors
    are those of the training part.

    Tokens are taken row by row from `token_set` (BOS positions dropped unless the pairing says
    otherwise) until `n_tokens` are stored (default: all). `batch_size` is in rows. Re-running
    with the same arguments continues an interrupted harvest; a larger `n_tokens` extends it; a
    different token set is appended as a new segment. The models run in eval mode, each on its
    own device (or both moved to `device` if given). `model_dtype` is the precision their
    forward passes run in (torch.autocast; the weights stay as they are): default bfloat16 on
    CUDA and float32 on the CPU; "float32" turns autocast off.

    Under torchrun (`distributed=None` detects a process group of more than one process; True
    requires one, False harvests as if alone) every process must make the same call: each
    harvests its own contiguous part of the rows into `out_dir/ranks-of-N/rank_R/`, then rank 0
    merges them into one store at `out_dir`, equal token for token to a single-process harvest
    (see docs/store.md). Such a run writes a new store or finishes its own interrupted one; it
    does not extend or append to an existing store.
    """
    if domains is not None:
        if not isinstance(token_set, Tensor):
            raise CrossdiffError(
                "domains= is for a plain token tensor; a TokenSet carries its own "
                "(TokenSet.domains and domain_names)"
            )
        token_set = tokens_with_domains(token_set, domains, domain_names)
    elif domain_names is not None:
        raise CrossdiffError("domain_names= needs domains= (one domain index per token row)")
    info = dist_info()
    if distributed is None:
        distributed = info.enabled
    if distributed and not info.enabled:
        raise CrossdiffError(
            "distributed=True but no torch.distributed process group of more than one process "
            "is running; launch with `torchrun --nproc_per_node N` and call "
            "crossdiff.distributed.init_distributed() first (the CLI does), or leave "
            "distributed=None"
        )
    lock = Path(out_dir) / ".harvest.lock"  # one harvest per store; under torchrun, rank 0's
    locked = folder_lock(lock, f"store {out_dir}", enabled=info.is_main or not distributed)
    with locked, _eval_mode((model_a, model_b)):
        return _harvest(
            model_a, model_b, token_set, pairing, out_dir, n_tokens=n_tokens,
            batch_size=batch_size, dtype=dtype, shard_tokens=shard_tokens,
            model_names=model_names, device=device, resume=resume, tokenizer=tokenizer,
            tokenizer_fingerprints=tokenizer_fingerprints, progress=progress,
            distributed=distributed, heldout_fraction=heldout_fraction, split_seed=split_seed,
            model_dtype=model_dtype,
        )  # fmt: skip


@dataclass
class _Job:
    """A checked harvest: the token rows, the models' runner, the store's header and sizes."""

    rows: _Tokens
    runner: _PairRunner
    pairing: Pairing
    widths: list[int]
    d_store: int
    store_dtype: torch.dtype
    header: dict[str, Any]
    segment: dict[str, Any]
    cumulative: Tensor  # [n_seq] tokens kept in rows 0..i
    target: int  # tokens of the token set to harvest
    batch_size: int
    shard_tokens: int
    verbose: bool
    heldout_docs: Tensor  # sorted doc ids of the held-out part

    def say(self, message: str) -> None:
        if self.verbose:
            print(message)


def _harvest(
    model_a: LensModel,
    model_b: LensModel,
    token_set: TokenSet | Tensor,
    pairing: Pairing | str | Path,
    out_dir: str | Path,
    *,
    n_tokens: int | None,
    batch_size: int,
    dtype: str | torch.dtype,
    shard_tokens: int | None,
    model_names: tuple[str, str],
    device: str | torch.device | None,
    resume: bool,
    tokenizer: Any,
    tokenizer_fingerprints: tuple[str | None, str | None] | None,
    progress: bool,
    distributed: bool,
    heldout_fraction: float,
    split_seed: int,
    model_dtype: str | torch.dtype | None = None,
) -> ActivationStore:
    out_dir = Path(out_dir)

    def prepare() -> _Job:
        return _prepare(
            model_a, model_b, token_set, pairing, n_tokens=n_tokens, batch_size=batch_size,
            dtype=dtype, shard_tokens=shard_tokens, model_names=model_names, device=device,
            tokenizer=tokenizer, tokenizer_fingerprints=tokenizer_fingerprints,
            verbose=not distributed or dist_info().is_main,
            heldout_fraction=heldout_fraction, split_seed=split_seed, model_dtype=model_dtype,
        )  # fmt: skip

    if distributed:
        from crossdiff.activations.sharded import harvest_ranks, together

        return harvest_ranks(together(prepare, "checking its inputs"), out_dir, resume, progress)
    job = prepare()
    writer = _open_store(out_dir, job.header, job.segment, resume)
    done = int(writer.manifest["segments"][-1]["n_tokens"])
    if done >= job.target:
        print(f"{out_dir} already holds {done} tokens of this token set; nothing to harvest")
        return ActivationStore(out_dir)
    with tqdm(
        total=job.target,
        initial=done,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {job.pairing.name}",
        disable=not progress,
    ) as bar:
        _fill(job, writer, done, job.target, bar)
    store = ActivationStore(out_dir)
    print(
        f"wrote {store.n_tokens} tokens ({store.n_models} models, width {store.d_model}, "
        f"{store.manifest['dtype']}) in {store.n_shards} shards to {out_dir}; parts: "
        f"{store.parts}"
    )
    return store


def _prepare(
    model_a: LensModel,
    model_b: LensModel,
    token_set: TokenSet | Tensor,
    pairing: Pairing | str | Path,
    *,
    n_tokens: int | None,
    batch_size: int,
    dtype: str | torch.dtype,
    shard_tokens: int | None,
    model_names: tuple[str, str],
    device: str | torch.device | None,
    tokenizer: Any,
    tokenizer_fingerprints: tuple[str | None, str | None] | None,
    verbose: bool,
    heldout_fraction: float = 0.1,
    split_seed: int = 0,
    model_dtype: str | torch.dtype | None = None,
) -> _Job:
    """Check the inputs, place the models, probe the widths and build the store's header."""
    pairing = load_pairing(pairing)
    models = (model_a, model_b)
    names = (str(model_names[0]), str(model_names[1]))
    if len(model_names) != 2 or names[0] == names[1]:
        raise CrossdiffError(f"model_names must be two different names, got {model_names}")
    if batch_size <= 0:
        raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
    store_dtype = resolve_dtype(dtype)
    rows = _as_tokens(token_set, pairing.drop_bos)
    heldout_docs = heldout_documents(rows.doc_ids, rows.keep, heldout_fraction, split_seed)
    _check_tokenizers(
        models,
        names,
        tokenizer_fingerprints,
        rows.tokens,
        getattr(token_set, "tokenizer_fingerprint", None),
    )
    for model, name, hooks in zip(models, names, (pairing.hooks_a, pairing.hooks_b), strict=True):
        _check_hooks(model, name, hooks)
        if device is not None and next(model.parameters()).device != resolve_device(device):
            model.to(resolve_device(device))
    expert_slot = _expert_slot(pairing, models)
    if pairing.expert_indices and expert_slot is None and verbose:
        print(
            f"note: neither model has {list(pairing.expert_indices)}; experts are stored as -1",
        )
    runner = _PairRunner(models, names, pairing, expert_slot)
    runner.model_dtype = _model_dtype(model_dtype, models)

    kept_per_row = rows.keep.sum(dim=1)
    cumulative = kept_per_row.cumsum(0)
    available = int(cumulative[-1])
    target = available if n_tokens is None else int(n_tokens)
    if target <= 0 or target > available:
        raise CrossdiffError(
            f"n_tokens={n_tokens} but the token set has {available} tokens to harvest "
            f"({len(rows.tokens)} rows, BOS dropped={pairing.drop_bos}); ask for at most "
            f"{available} or give a bigger token set"
        )

    with torch.no_grad():
        widths, expert_width = _probe_widths(runner, rows.tokens)
    d_store = max(widths)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_names": list(names),
        "models": [
            {
                "name": n,
                "config_hash": config_hash(m),
                "weights_hash": weights_hash(m),
                "d_model": int(m.cfg.d_model),
            }
            for n, m in zip(names, models, strict=True)
        ],
        "hook_points": {names[0]: list(pairing.hooks_a), names[1]: list(pairing.hooks_b)},
        "pairing": pairing.to_dict(),
        "dtype": dtype_name(store_dtype),
        "model_dtype": dtype_name(runner.model_dtype),
        "d_model": d_store,
        "d_models": widths,
        "experts": {
            "model": None if expert_slot is None else names[expert_slot],
            "hooks": list(runner.expert_hooks),
            "width": max(expert_width, 1),
            "layout": _expert_layout(runner, models),
        },
        "tokenizer": _tokenizer_info(
            tokenizer,
            models,
            tokenizer_fingerprints,
            getattr(token_set, "tokenizer_fingerprint", None),
        ),
        "domain_names": list(rows.domain_names),
        "split": {
            "unit": "document",
            "heldout_fraction": float(heldout_fraction),
            "seed": int(split_seed),
        },
    }
    doc_list = json.dumps(heldout_docs.tolist())
    segment = {
        "token_set": rows.fingerprint,
        "n_seq": int(rows.tokens.shape[0]),
        "seq_len": int(rows.tokens.shape[1]),
        "start": 0,
        "documents": int(torch.unique(rows.doc_ids[rows.keep]).numel()),
        "heldout_documents": int(heldout_docs.numel()),
        "heldout_documents_sha256": hashlib.sha256(doc_list.encode()).hexdigest()[:32],
    }
    if shard_tokens is None:
        shard_tokens = max(1024, SHARD_BYTES // (2 * d_store * store_dtype.itemsize))
    return _Job(
        rows=rows, runner=runner, pairing=pairing, widths=widths, d_store=d_store,
        store_dtype=store_dtype, header=header, segment=segment, cumulative=cumulative,
        target=target, batch_size=batch_size, shard_tokens=int(shard_tokens), verbose=verbose,
        heldout_docs=heldout_docs,
    )  # fmt: skip


def _fill(job: _Job, writer: StoreWriter, done: int, target: int, bar: Any) -> None:
    """Harvest tokens [done, target) of the token set (kept tokens, row by row) into `writer`.

    Rows always go through the models in the same fixed batches (rows b*batch_size up to
    (b+1)*batch_size), whichever part of the token set is harvested: an interrupted, extended or
    rank-split harvest computes exactly the batches of one uninterrupted run.
    """
    rows, cumulative, batch_size = job.rows, job.cumulative, job.batch_size
    shard_tokens = job.shard_tokens
    first_row = int(torch.searchsorted(cumulative, done, right=True))
    start_row = first_row // batch_size * batch_size  # batches stay aligned across resumes
    skip = done - (int(cumulative[start_row - 1]) if start_row > 0 else 0)
    end_row = int(torch.searchsorted(cumulative, target - 1, right=True)) + 1
    remaining = target - done

    buffer: list[dict[str, Tensor]] = []
    n_buffered = 0

    def flush(final: bool) -> None:
        nonlocal buffer, n_buffered
        if not buffer:
            return
        merged = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}
        lo = 0
        while n_buffered - lo >= shard_tokens or (final and n_buffered > lo):
            hi = min(lo + shard_tokens, n_buffered)
            writer.write_shard({k: v[lo:hi] for k, v in merged.items()})
            lo = hi
        buffer = [{k: v[lo:] for k, v in merged.items()}] if lo < n_buffered else []
        n_buffered -= lo

    with torch.no_grad(), ExitStack() as stack:
        job.runner.install(stack)
        for row in range(start_row, end_row, batch_size):
            stop = min(row + batch_size, len(rows.tokens))  # fixed batches: same rounding
            acts, experts = job.runner.run(rows.tokens[row:stop], row)
            chunk = _select(
                rows, row, stop, acts, experts, job.widths, job.d_store, job.store_dtype
            )
            chunk["heldout"] = torch.isin(chunk["doc_ids"], job.heldout_docs)
            n = chunk["acts"].shape[0]
            lo, hi = min(skip, n), min(n, skip + remaining)
            skip -= lo
            if hi > lo:
                buffer.append({k: v[lo:hi] for k, v in chunk.items()})
                n_buffered += hi - lo
                remaining -= hi - lo
                bar.update(hi - lo)
            if n_buffered >= shard_tokens:
                flush(final=False)
        flush(final=True)
    if remaining != 0:
        raise CrossdiffError(f"internal error: harvest ended {remaining} tokens short")


def _select(
    rows: _Tokens,
    start: int,
    stop: int,
    acts: list[Tensor],
    experts: Tensor | None,
    widths: list[int],
    d_store: int,
    store_dtype: torch.dtype,
) -> dict[str, Tensor]:
    keep = rows.keep[start:stop].reshape(-1)
    index = keep.nonzero().squeeze(1)
    n = index.shape[0]
    out = torch.zeros(n, len(acts), d_store, dtype=store_dtype)
    for m, x in enumerate(acts):
        if x.shape[-1] != widths[m]:
            raise CrossdiffError(
                f"model {m} activations changed width from {widths[m]} to {x.shape[-1]}"
            )
        out[:, m, : widths[m]] = x.reshape(-1, widths[m]).cpu()[index].to(store_dtype)
    seq_len = rows.tokens.shape[1]
    if experts is None:
        expert_ids = torch.full((n, 1), -1, dtype=torch.int16)
    else:
        expert_ids = experts.reshape(-1, experts.shape[-1]).cpu()[index].to(torch.int16)
    domains = rows.domains[start:stop].unsqueeze(1).expand(-1, seq_len).reshape(-1)
    return {
        "acts": out,
        "token_ids": rows.tokens[start:stop].reshape(-1)[index].to(torch.int32),
        "doc_ids": rows.doc_ids[start:stop].reshape(-1)[index].to(torch.int64),
        "positions": rows.positions[start:stop].reshape(-1)[index].to(torch.int32),
        "domains": domains[index].to(torch.int16),
        "experts": expert_ids,
    }
