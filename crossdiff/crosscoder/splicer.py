"""The splicing itself: the batches, both models' clean activations at the paired sites, the
crosscoder's reconstruction of them, and a forward pass with sites replaced (spliced_loss.py says
what is measured; spliced_forwards.py runs the passes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from crossdiff.activations.runner import stop_layer
from crossdiff.integrations.lens import LensModel
from crossdiff.plumbing.common import CrossdiffError

KINDS = ("clean", "spliced", "zero", "mean")
# Below this many nats between ablated and clean CE, loss recovered divides noise by noise.
MIN_ABLATION_GAP = 0.05
ENCODE_CHUNK = 4096  # tokens per crosscoder call
FORMULA = "loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)"


class Splicer:
    """The batches, the clean activations of both models and the patched forward passes."""

    def __init__(
        self,
        cc: Any,
        models: tuple[LensModel, ...],
        names: tuple[str, ...],
        hooks: tuple[tuple[str, ...], ...],
        tokens: Tensor,
        keep: Tensor,
        batch_size: int,
        progress: bool,
    ) -> None:
        self.cc, self.models, self.names, self.hooks = cc, models, names, hooks
        self.tokens, self.keep, self.batch_size, self.progress = tokens, keep, batch_size, progress
        self.stops = [stop_layer(m, h) for m, h in zip(models, hooks, strict=True)]
        first = [self.capture(m, tokens[:1]) for m in range(len(models))]
        self.site_widths = [[x.shape[-1] for x in acts] for acts in first]
        self.widths = [sum(w) for w in self.site_widths]
        d_cc = int(cc.cfg.d_model)
        if max(self.widths) != d_cc:
            detail = ", ".join(
                f"{n}: {list(h)} -> width {w}"
                for n, h, w in zip(names, hooks, self.widths, strict=True)
            )
            raise CrossdiffError(
                f"the crosscoder reads activations of width {d_cc}, but this pairing gives "
                f"{detail} (a store pads to the widest, {max(self.widths)}); pass the pairing "
                "and models the crosscoder's store was harvested with"
            )

    def batches(self, desc: str) -> Any:
        starts = range(0, len(self.tokens), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not self.progress):
            stop = start + self.batch_size
            yield self.tokens[start:stop], self.keep[start:stop]

    def device(self, m: int) -> torch.device:
        return next(self.models[m].parameters()).device

    def capture(self, m: int, tokens: Tensor, loss: list[float] | None = None) -> list[Tensor]:
        """Model m's clean activation at each of its sites, [batch, pos, d_site] each; with
        `loss`, the full forward's summed next-token CE is appended to it."""
        model, captured = self.models[m], {}

        def saver(requested: str) -> Any:
            # kept under the name asked for: a TransformerBridge calls a hook asked for by its
            # alias (blocks.1.hook_resid_post) with its own name (blocks.1.hook_out)
            def save(value: Tensor, hook: Any) -> None:
                captured[requested] = value.detach()

            return save

        out = model.run_with_hooks(
            tokens.to(self.device(m)),
            return_type=None if loss is None else "loss",
            loss_per_token=True,
            stop_at_layer=self.stops[m] if loss is None else None,
            fwd_hooks=[(h, saver(h)) for h in dict.fromkeys(self.hooks[m])],
        )
        if loss is not None:
            loss.append(float(out.to(torch.float64).sum()))
        out = []
        for hook in self.hooks[m]:
            x = captured.get(hook)
            if x is None or x.ndim != 3 or tuple(x.shape[:2]) != tuple(tokens.shape):
                shape = None if x is None else tuple(x.shape)
                raise CrossdiffError(
                    f"hook {hook!r} of model {self.names[m]!r} gave {shape}; a paired site must "
                    f"output [batch, pos, d] (here {list(tokens.shape)} + [d])"
                )
            out.append(x)
        return out

    def given_means(self, given: Sequence[Tensor]) -> list[list[Tensor]]:
        """The given mean-ablation values (per model, its concatenated sites) split per site."""
        if len(given) != len(self.models):
            raise CrossdiffError(f"ablation_means needs one tensor per model, got {len(given)}")
        out = []
        for m, mean in enumerate(given):
            mean = torch.as_tensor(mean).flatten()
            if mean.shape[0] < self.widths[m]:
                raise CrossdiffError(
                    f"ablation_means[{m}] has {mean.shape[0]} values; model "
                    f"{self.names[m]!r}'s sites are {self.widths[m]} wide"
                )
            out.append(list(mean[: self.widths[m]].split(self.site_widths[m])))
        return out

    def reconstruct(self, acts: list[list[Tensor]]) -> list[list[Tensor]]:
        """Per model and site, the crosscoder's reconstruction from both models' clean acts."""
        cc = self.cc
        d_cc = int(cc.cfg.d_model)
        batch, pos = acts[0][0].shape[:2]
        x = torch.zeros(batch * pos, len(acts), d_cc, dtype=cc.dtype, device=cc.device)
        for m, sites in enumerate(acts):
            x[:, m, : self.widths[m]] = torch.cat(sites, -1).reshape(batch * pos, -1).to(x)
        x_hat = torch.cat([cc.decode(cc.encode(chunk)) for chunk in x.split(ENCODE_CHUNK)], dim=0)
        out = []
        for m in range(len(acts)):
            flat = x_hat[:, m, : self.widths[m]].reshape(batch, pos, -1)
            out.append(list(flat.split(self.site_widths[m], dim=-1)))
        return out

    def loss_sum(self, m: int, tokens: Tensor, keep: Tensor, patches: dict[str, Tensor]) -> float:
        """Sum of next-token CE over the batch, with `patches` (hook -> value) at kept positions."""
        device = self.device(m)
        keep = keep.to(device)[..., None]
        fwd_hooks = []
        for hook, value in patches.items():

            def patch(act: Tensor, hook: Any, value: Tensor = value) -> Tensor:
                return torch.where(keep, value.to(act.device, act.dtype).expand_as(act), act)

            fwd_hooks.append((hook, patch))
        per_token = self.models[m].run_with_hooks(
            tokens.to(device), return_type="loss", loss_per_token=True, fwd_hooks=fwd_hooks
        )
        return float(per_token.to(torch.float64).sum())

    def result(self, sums: dict[tuple, float], per_site: bool, given_means: bool) -> dict:
        n_seq, seq_len = self.tokens.shape
        n_targets = n_seq * (seq_len - 1)
        notes: list[str] = []
        models_out = {}
        for m, name in enumerate(self.names):
            hooks = self.hooks[m]
            clean = sums[(m, "all", "clean")] / n_targets

            def entry(scope: Any, what: str, m: int = m, clean: float = clean) -> dict:
                ce = {k: sums[(m, scope, k)] / n_targets for k in KINDS[1:]}
                return _entry(clean, ce, what, notes)

            block = entry("all", f"{name}, all sites")
            block["sites"] = list(hooks)
            if per_site:
                if len(hooks) == 1:
                    block["per_site"] = [dict(entry("all", ""), hook=hooks[0])]
                else:
                    block["per_site"] = [
                        dict(entry(s, f"{name}, {hook}"), hook=hook) for s, hook in enumerate(hooks)
                    ]
            models_out[name] = block
        n_spliced = int(self.keep.sum())
        return {
            "models": models_out,
            "n_sequences": int(n_seq),
            "seq_len": int(seq_len),
            "n_targets": int(n_targets),
            "n_spliced_positions": n_spliced,
            "encode": "threshold (inference)",
            "mean_ablation": "given means" if given_means else "mean over the evaluated tokens",
            "formula": FORMULA,
            "min_ablation_gap": MIN_ABLATION_GAP,
            "notes": notes,
        }


def _entry(clean: float, ce: dict[str, float], what: str, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ce_clean": clean,
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "ce_mean_ablated": ce["mean"],
        "ce_delta": ce["spliced"] - clean,
    }
    for kind in ("zero", "mean"):
        gap = ce[kind] - clean
        out[f"loss_recovered_{kind}"] = loss_recovered(clean, ce["spliced"], ce[kind])
        if what and gap < MIN_ABLATION_GAP:
            notes.append(
                f"{what}: {kind}-ablation changes the loss by {gap:+.4f} nats (less than "
                f"+{MIN_ABLATION_GAP}), so loss recovered against it is unreliable"
            )
    return out


def loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float | None:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean); None when ablation does not hurt."""
    gap = ce_ablated - ce_clean
    if not math.isfinite(gap) or gap <= 0:
        return None
    return (ce_ablated - ce_spliced) / gap
