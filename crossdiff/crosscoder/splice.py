"""Spliced-in language-model loss: each model's loss with its paired activations replaced by the
crosscoder's reconstruction, against the clean loss and the loss with those activations ablated.

For model m and a set S of its paired sites (all of them at once, or one at a time):
    CE_clean    the model as it is
    CE_spliced  x_s <- x_hat_{m,s} at every s in S, where x_hat_m decodes the crosscoder's
                latents of *both* models' clean activations (it reads [n_models, d])
    CE_zero     x_s <- 0 at every s in S
    CE_mean     x_s <- the mean of x_s (over the evaluated tokens, or given)
    loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean), against each ablation.
Positions the harvest skips (BOS when the pairing drops it) keep their clean activation. Every
replacement is computed from the clean run, so splicing several sites at once replaces each with
the reconstruction of its clean value. CE is the mean next-token cross-entropy over all targets
(columns 1.. of every row), as the models stage's held-out evaluation reports it.

The crosscoder takes and returns raw activations (its scaling factors are folded into its
weights, as `train_crosscoder` and `CrossCoder.load` give it); a model's vector is the
concatenation of its sites' outputs in site order, zero-padded to the crosscoder's d_model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from crossdiff.activations.identity import check_tokenizers, weights_hash
from crossdiff.activations.pairing import Pairing, load_pairing
from crossdiff.activations.rows import as_token_rows
from crossdiff.activations.runner import check_hooks, eval_mode, stop_layer
from crossdiff.common import CrossdiffError
from crossdiff.data.tokens import TokenSet

KINDS = ("clean", "spliced", "zero", "mean")
SPLICE_SEQUENCES = 64  # held-out rows `crossdiff run` and `crossdiff report` splice by default
# Below this many nats between ablated and clean CE, loss recovered divides noise by noise.
MIN_ABLATION_GAP = 0.05
ENCODE_CHUNK = 4096  # tokens per crosscoder call
FORMULA = "loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)"


@torch.no_grad()
def spliced_loss(
    cc: Any,
    models: Sequence[HookedTransformer],
    tokens: TokenSet | Int[Tensor, "n_seq seq_len"],
    pairing: Pairing | str | Path,
    *,
    model_names: Sequence[str] | None = None,
    max_sequences: int | None = None,
    batch_size: int = 8,
    ablation_means: Sequence[Tensor] | None = None,
    per_site: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """CE clean / spliced / zero-ablated / mean-ablated and loss recovered, per model.

    `models` are the models in the crosscoder's order (as harvested: dense, moe), `tokens` held-out
    rows (the first `max_sequences` are used). `ablation_means` (per model, the raw mean of its
    concatenated sites, e.g. a store's `running_stats.mean(m)`) replaces the default: the mean over
    the evaluated tokens the crosscoder reads. `per_site` adds each site spliced on its own.
    Returns {"models": {name: {..., "per_site": [...]}}, "n_sequences", "n_targets", ...}.
    """
    pairing = load_pairing(pairing)
    models = tuple(models)
    names = tuple(model_names or ("dense", "moe")[: len(models)])
    n_models = int(cc.cfg.n_models)
    if len(models) != n_models or len(names) != n_models:
        raise CrossdiffError(
            f"the crosscoder reads {n_models} models but {len(models)} models and "
            f"{len(names)} names were given; pass the models in the order they were harvested"
        )
    if n_models != 2:
        raise CrossdiffError(f"spliced loss needs a crosscoder of 2 models, got {n_models}")
    if batch_size <= 0:
        raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
    rows = as_token_rows(tokens, pairing.drop_bos)
    if max_sequences is not None:
        if max_sequences <= 0:
            raise CrossdiffError(f"max_sequences must be positive, got {max_sequences}")
        rows.tokens, rows.keep = rows.tokens[:max_sequences], rows.keep[:max_sequences]
    if rows.tokens.shape[1] < 2:
        raise CrossdiffError("token rows need at least 2 tokens to have a next-token target")
    check_tokenizers(models, names, None, rows.tokens)  # type: ignore[arg-type]
    hooks = (pairing.hooks_a, pairing.hooks_b)
    for model, name, model_hooks in zip(models, names, hooks, strict=True):
        check_hooks(model, name, model_hooks)
    with eval_mode(models):
        splicer = _Splicer(cc, models, names, hooks, rows.tokens, rows.keep, batch_size, progress)
        means = splicer.means(ablation_means)
        sums = splicer.losses(means, per_site)
    return splicer.result(sums, per_site, given_means=ablation_means is not None)


class _Splicer:
    """The batches, the clean activations of both models and the patched forward passes."""

    def __init__(
        self,
        cc: Any,
        models: tuple[HookedTransformer, ...],
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

        def save(value: Tensor, hook: Any) -> None:
            captured[hook.name] = value.detach()

        out = model.run_with_hooks(
            tokens.to(self.device(m)),
            return_type=None if loss is None else "loss",
            loss_per_token=True,
            stop_at_layer=self.stops[m] if loss is None else None,
            fwd_hooks=[(h, save) for h in dict.fromkeys(self.hooks[m])],
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

    def means(self, given: Sequence[Tensor] | None) -> list[list[Tensor]]:
        """The mean-ablation value per model and site: given, or over the evaluated kept tokens."""
        if given is not None:
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
        sums = [torch.zeros(w, dtype=torch.float64) for w in self.widths]
        count = 0
        for tokens, keep in self.batches("splice: means"):
            count += int(keep.sum())
            for m in range(len(self.models)):
                x = torch.cat(self.capture(m, tokens), dim=-1)
                sums[m] += x[keep.to(x.device)].to(torch.float64).sum(0).cpu()
        if count == 0:
            raise CrossdiffError("no token positions to splice (every position is skipped)")
        return [list((s / count).split(self.site_widths[m])) for m, s in enumerate(sums)]

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

    def losses(self, means: list[list[Tensor]], per_site: bool) -> dict[tuple, float]:
        """Summed CE per (model, scope, kind); scope is "all" or a site index."""
        sums: dict[tuple, float] = {}

        def add(key: tuple, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + value

        for tokens, keep in self.batches("splice: losses"):
            clean_loss: list[float] = []
            clean = [self.capture(m, tokens, clean_loss) for m in range(len(self.models))]
            recon = self.reconstruct(clean)
            for m in range(len(self.models)):
                hooks = self.hooks[m]
                values = {
                    "spliced": recon[m],
                    "zero": [torch.zeros(()) for _ in hooks],
                    "mean": means[m],
                }
                add((m, "all", "clean"), clean_loss[m])
                scopes: list[Any] = ["all"]
                if per_site and len(hooks) > 1:
                    scopes += list(range(len(hooks)))
                for scope in scopes:
                    sites = range(len(hooks)) if scope == "all" else [scope]
                    for kind, per_hook in values.items():
                        patches = {hooks[s]: per_hook[s] for s in sites}
                        add((m, scope, kind), self.loss_sum(m, tokens, keep, patches))
        return sums

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


def spliced_loss_on(
    cc: Any,
    acts_or_store: Any,
    models: Sequence[HookedTransformer],
    tokens: TokenSet | Tensor | None,
    *,
    pairing: Pairing | str | Path | None = None,
    model_names: Sequence[str] | None = None,
    max_sequences: int | None = None,
) -> dict[str, Any]:
    """`spliced_loss` for `evaluate_crosscoder`: pairing and model names default to the store's."""
    if tokens is None:
        raise CrossdiffError(
            "models were given but no tokens: pass tokens=... (held-out token rows, a TokenSet or "
            "a LongTensor [n_seq, seq_len]) to compute the spliced-in loss"
        )
    manifest = getattr(acts_or_store, "manifest", None) or {}
    if pairing is None:
        if "pairing" not in manifest:
            raise CrossdiffError(
                "pass pairing=... (the preset name, TOML path or Pairing the activations were "
                "harvested with): a tensor of activations does not say which hooks it came from"
            )
        pairing = Pairing.from_dict(manifest["pairing"], "the store's manifest")
    if model_names is None and manifest.get("model_names"):
        model_names = list(manifest["model_names"])
    return spliced_loss(
        cc, models, tokens, pairing, model_names=model_names, max_sequences=max_sequences
    )


def spliced_loss_for_run(
    cc: Any,
    store: Any,
    models_dir: str | Path,
    heldout: TokenSet,
    *,
    max_sequences: int,
    device: str | torch.device = "cpu",
) -> dict[str, Any] | None:
    """The report's spliced-in loss: the store's models from `models_dir/<name>` on held-out rows.

    None (with a printed note) when there are no held-out rows or a model folder is missing;
    an error when the models are not the ones the store was harvested from.
    """
    from crossdiff.models import load_model

    if max_sequences <= 0:
        return None
    if len(heldout) == 0:
        print("spliced loss: the held-out token set is empty, so it is not computed")
        return None
    names = list(store.model_names)
    dirs = [Path(models_dir) / name for name in names]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        print(f"spliced loss: no model folder {missing}, so it is not computed")
        return None
    models = [load_model(d, device=device) for d in dirs]
    for model, record in zip(models, store.manifest.get("models", []), strict=False):
        expected = record.get("weights_hash")
        if expected and weights_hash(model) != expected:
            raise CrossdiffError(
                f"the model in {models_dir}/{record['name']} is not the one the store was "
                "harvested from (weights differ); pass the models folder of the same run"
            )
    n_rows = min(max_sequences, len(heldout))
    print(f"spliced loss: {n_rows} held-out rows, models from {models_dir}")
    return spliced_loss(
        cc,
        models,
        heldout,
        Pairing.from_dict(store.manifest["pairing"], "the store's manifest"),
        model_names=names,
        max_sequences=max_sequences,
        progress=True,
    )


def summary_lines(spliced: dict[str, Any] | None) -> list[str]:
    """One line per model: CE clean / spliced / ablated and loss recovered, all sites at once."""
    if not spliced:
        return []
    lines = []
    for name, r in spliced["models"].items():
        lines.append(
            f"spliced loss {name}: CE clean {r['ce_clean']:.4f}, spliced {r['ce_spliced']:.4f}, "
            f"zero-ablated {r['ce_zero_ablated']:.4f}, mean-ablated {r['ce_mean_ablated']:.4f}; "
            f"loss recovered {_pct(r['loss_recovered_zero'])} (vs zero), "
            f"{_pct(r['loss_recovered_mean'])} (vs mean)"
        )
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
