"""Running the pair: both models on the same token batch, each up to the deepest block the pairing
reads, with their activations at the pairing's hook points (and the experts routed to) captured."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from crossdiff.activations.bridge import router_hook
from crossdiff.activations.identity import LensModel
from crossdiff.activations.pairing import Pairing, hook_layer
from crossdiff.activations.store_layout import expert_column_map
from crossdiff.plumbing.common import CrossdiffError, resolve_dtype


def check_hooks(model: LensModel, name: str, hooks: tuple[str, ...]) -> None:
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


def stop_layer(model: LensModel, hooks: tuple[str, ...]) -> int | None:
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    return min(max(layers) + 1, model.cfg.n_layers)  # type: ignore[type-var]


def expert_slot(pairing: Pairing, models: tuple[LensModel, ...]) -> int | None:
    if not pairing.expert_indices:
        return None
    has = [
        all(h in m.hook_dict or router_hook(m, h) for h in pairing.expert_indices) for m in models
    ]
    if pairing.expert_model in ("a", "b"):
        slot = "ab".index(pairing.expert_model)
        return slot if has[slot] else None
    return 1 if has[1] else (0 if has[0] else None)


def expert_layout(runner: PairRunner, models: tuple[LensModel, ...]) -> list[dict]:
    """Which columns of the experts row each expert hook wrote (after the width probe)."""
    if runner.expert_slot is None:
        return []
    n_experts = getattr(models[runner.expert_slot].cfg, "num_experts", None)
    return expert_column_map(runner.expert_hooks, runner.expert_top_k, n_experts)


def _did_not_fire(hook: str, name: str) -> str:
    return (
        f"hook {hook!r} of model {name!r} did not fire during the forward: it exists but the "
        "model does not compute it as configured (e.g. attn.hook_result needs "
        "model.set_use_attn_result(True), split-QKV hooks model.set_use_split_qkv_input(True)); "
        "enable it on the model or pair another hook"
    )


class PairRunner:
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
        # on a Bridge: expert hook -> (its router's hook, top_k); the ids are the router's top-k
        self.routers: dict[str, tuple[str, int]] = {}
        if expert_slot is not None:
            for hook in self.expert_hooks:
                found = router_hook(models[expert_slot], hook)
                if found is not None:
                    self.routers[hook] = found
        self.expert_top_k: list[int] = []  # columns per expert hook, set by run()
        self.captured: list[dict[str, Tensor]] = [{}, {}]
        self.stops = []
        self.model_dtype = torch.float32  # the forward passes' precision (autocast below it)
        for slot, model in enumerate(models):
            names_read = tuple(self._hooked_name(slot, h) for h in self._read_by(slot))
            self.stops.append(stop_layer(model, names_read))

    def _read_by(self, slot: int) -> tuple[str, ...]:
        extra = self.expert_hooks if slot == self.expert_slot else ()
        return tuple(dict.fromkeys(self.hooks[slot] + extra))

    def _hooked_name(self, slot: int, requested: str) -> str:
        """The hook point that is hooked for `requested` (a Bridge's router for its experts)."""
        if slot == self.expert_slot and requested in self.routers:
            return self.routers[requested][0]
        return requested

    def install(self, stack: ExitStack) -> None:
        for slot, model in enumerate(self.models):
            store = self.captured[slot]

            def saver(requested: str, store: dict[str, Tensor] = store) -> Any:
                # kept under the name the pairing asked for: a TransformerBridge calls the hook
                # with its canonical name (blocks.1.hook_out for blocks.1.hook_resid_post)
                def save(tensor: Tensor, hook: Any) -> None:
                    store[requested] = tensor.detach()

                return save

            hooks = [(self._hooked_name(slot, n), saver(n)) for n in self._read_by(slot)]
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
            raise CrossdiffError(_did_not_fire(self._hooked_name(slot, hook), name))
        if hook in self.routers:  # a Bridge's router: [batch*pos, n_experts] -> top-k ids
            x = x.float().topk(self.routers[hook][1], dim=-1).indices
        if x.ndim == 2 and x.shape[0] == batch * pos:  # stock TransformerLens MoE: [batch*pos, k]
            x = x.reshape(batch, pos, -1)
        if x.ndim != 3 or tuple(x.shape[:2]) != (batch, pos):
            raise CrossdiffError(
                f"expert hook {hook!r} of model {name!r} outputs shape {tuple(x.shape)}; "
                "expected [batch, pos, top_k] or [batch*pos, top_k]"
            )
        return x.long()


def resolve_model_dtype(
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


@contextmanager
def eval_mode(models: tuple[LensModel, ...]) -> Iterator[None]:
    """Harvest in eval mode (no dropout or router noise), then give the models back as they were."""
    training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(models, training, strict=True):
            m.train(was_training)


def probe_widths(runner: PairRunner, tokens: Tensor) -> tuple[list[int], int]:
    with ExitStack() as stack:
        runner.install(stack)
        acts, experts = runner.run(tokens[:1], 0)
    return [a.shape[-1] for a in acts], (experts.shape[-1] if experts is not None else 0)
