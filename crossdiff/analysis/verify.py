"""Screen-and-verify: is a candidate exclusive latent causal in its model, and not in the other?

Screen (`screen_candidates`): per exclusive class (A-only, B-only: from the partition for a DFC,
from the relative norm otherwise), the `n` live latents with the largest activation mass (fire
count x mean activation on the analysed tokens).

Verify (`verify_latents`), on held-out token rows, for candidate latent j owned by model m, with
d = its decoder vector in model m (raw units) and f_j its activation (the crosscoder encodes both
models' clean activations at the paired sites):
  ablation  x_m <- x_m - f_j d at the paired site(s), at every kept position;
  steering  x_m <- x_m + s_j d at every kept position, s_j = steer_factor x the latent's largest
            activation on the rows;
and the same intervention (the same vector, cut or zero-padded to the width) in the other model
is the control. Measured: KL(clean || intervened) of the next-token distribution (ablation: over
the positions where the latent fires; steering: over all kept positions), the change of the mean
next-token loss (CE, per domain where the rows have domains), and the tokens whose logits
steering raises and lowers most. When the two models share a basis (a fine-tune, a planted edit,
a same-model null) the control is exactly the same edit; between independently trained models
(dense vs MoE) it is an edit of the same size along a direction the other model has no reason to
read: a baseline for "any perturbation this large".

Verified: for the ablation KL and for the steering KL alike, the per-row difference (own -
control) has a bootstrap 95 % interval above 0 and the own effect is at least `min_ratio` (2)
times the control's: an effect in both models that is only somewhat larger in one (a direction
the other model also reads) does not verify. A class's verified share has a Wilson 95 % interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from crossdiff.activations.pairing import Pairing, load_pairing
from crossdiff.activations.rows import as_token_rows
from crossdiff.activations.runner import check_hooks, eval_mode
from crossdiff.analysis.classes import DEAD, DESIGNATED, SHARED
from crossdiff.analysis.verify_stats import bootstrap_mean_ci, wilson_interval
from crossdiff.plumbing.common import CrossdiffError

DEFAULT_CANDIDATES = 8  # per exclusive class
DEFAULT_SEQUENCES = 32  # held-out rows
STEER_FACTOR = 2.0
MIN_RATIO = 2.0  # own effect over the control's, at least
SCORE = "activation mass: fire_count x mean_activation on the analysed tokens"


def screen_candidates(table: Any, model_names: Sequence[str], n: int) -> dict[int, int]:
    """latent -> owner model index: the `n` live latents of each exclusive class with the
    largest activation mass (table: a FeatureDiff's table, `class` column)."""
    out: dict[int, int] = {}
    live = table[(table["fire_count"] > 0)]
    mass = live["fire_count"].to_numpy() * np.nan_to_num(live["mean_activation"].to_numpy())
    for m, name in enumerate(model_names):
        cls = f"{name}-only"
        mask = (live["class"] == cls).to_numpy()
        ids = live["latent"].to_numpy()[mask]
        for j in ids[np.argsort(-mass[mask], kind="stable")][:n]:
            out[int(j)] = m
    return out


class _Runner:
    """Both models on a batch of rows: clean logits and activations, and patched runs."""

    def __init__(self, cc: Any, models: tuple, hooks: tuple, keep: Tensor) -> None:
        self.cc, self.models, self.hooks, self.keep = cc, models, hooks, keep

    def run(self, m: int, tokens: Tensor, patch: list[Tensor] | None = None) -> tuple:
        """Model m's logits [batch, pos, vocab] (float32) and its site activations; `patch` (one
        delta [batch, pos, d_site] per site) is added at the sites first."""
        model, captured = self.models[m], {}
        device = next(model.parameters()).device
        hooks = []
        for s, name in enumerate(self.hooks[m]):
            # kept under the name asked for: a TransformerBridge calls a hook asked for by its
            # alias (blocks.1.hook_resid_post) with its own name (blocks.1.hook_out)
            def fn(act: Tensor, hook: Any, s: int = s, name: str = name) -> Tensor:
                if patch is not None:
                    act = act + patch[s].to(act.device, act.dtype)
                captured.setdefault(name, []).append(act.detach())
                return act

            hooks.append((name, fn))
        logits = model.run_with_hooks(tokens.to(device), fwd_hooks=hooks).float()
        acts = [captured[h][0] for h in self.hooks[m]] if patch is None else []
        return logits, acts


def _latent_acts(cc: Any, acts: list[list[Tensor]], latents: list[int]) -> Tensor:
    """[batch, pos, n_latents]: the crosscoder's activations of `latents` on clean activations."""
    d_cc = int(cc.cfg.d_model)
    batch, pos = acts[0][0].shape[:2]
    x = torch.zeros(batch * pos, len(acts), d_cc, dtype=cc.dtype, device=cc.device)
    for m, sites in enumerate(acts):
        flat = torch.cat(sites, -1).reshape(batch * pos, -1)
        x[:, m, : flat.shape[-1]] = flat.to(x)
    f = torch.cat([cc.encode(chunk)[:, latents] for chunk in x.split(4096)], dim=0)
    return f.float().reshape(batch, pos, len(latents)).cpu()


def _kl(clean: Tensor, patched: Tensor) -> Tensor:
    """KL(clean || patched) per position, from logits [batch, pos, vocab]."""
    lp, lq = clean.log_softmax(-1), patched.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token CE per target [batch, pos - 1]."""
    lp = logits[:, :-1].log_softmax(-1)
    return -lp.gather(-1, tokens[:, 1:, None].to(lp.device)).squeeze(-1)


@torch.no_grad()
def verify_latents(
    cc: Any,
    models: Sequence[Any],
    tokens: Any,
    pairing: Pairing | str | Path,
    latents: dict[int, int] | Sequence[int],
    *,
    model_names: Sequence[str] | None = None,
    max_sequences: int = DEFAULT_SEQUENCES,
    batch_size: int = 8,
    steer_factor: float = STEER_FACTOR,
    n_logits: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    tokenizer: Any = None,
    min_ratio: float = MIN_RATIO,
    progress: bool = False,
) -> dict[int, dict[str, Any]]:
    """latent -> its verification (see the module docstring). `latents`: latent -> owner model
    index (what `screen_candidates` gives), or latent ids (owner: the model of the larger decoder
    norm). `tokens`: held-out rows (TokenSet or LongTensor [n_seq, seq_len]); `models` in the
    crosscoder's order, with the pairing's hooks."""
    from crossdiff.analysis.contexts import _token_text

    pairing = load_pairing(pairing)
    models = tuple(models)
    if len(models) != 2 or int(cc.cfg.n_models) != 2:
        raise CrossdiffError(
            f"screen-and-verify compares 2 models; got {len(models)} models for a crosscoder of "
            f"{cc.cfg.n_models}"
        )
    names = tuple(model_names or ("A", "B"))
    hooks = (pairing.hooks_a, pairing.hooks_b)
    for model, name, model_hooks in zip(models, names, hooks, strict=True):
        check_hooks(model, name, model_hooks)
    if not isinstance(latents, dict):
        norms = cc.W_dec.detach().norm(dim=-1)
        latents = {int(j): int(norms[int(j)].argmax()) for j in latents}
    ids = sorted(latents)
    if not ids:
        return {}
    if max_sequences <= 0 or batch_size <= 0:
        raise CrossdiffError(
            f"max_sequences={max_sequences} and batch_size={batch_size} must be positive"
        )
    rows = as_token_rows(tokens, pairing.drop_bos)
    toks, keep = rows.tokens[:max_sequences], rows.keep[:max_sequences]
    domains = rows.domains[:max_sequences]
    domain_names = tuple(rows.domain_names)
    if toks.shape[1] < 2:
        raise CrossdiffError("token rows need at least 2 tokens to have a next-token target")
    w_dec = cc.W_dec.detach().float().cpu()
    with eval_mode(models):
        runner = _Runner(cc, models, hooks, keep)
        batches = [(s, min(s + batch_size, len(toks))) for s in range(0, len(toks), batch_size)]
        fs, scale = {}, torch.zeros(len(ids))
        for start, stop in batches:  # pass 1: latent activations and steering scales
            acts = [runner.run(m, toks[start:stop])[1] for m in range(2)]
            fs[start] = _latent_acts(cc, acts, ids) * keep[start:stop, :, None]
            scale = torch.maximum(scale, fs[start].flatten(0, 1).max(0).values)
        acc = {j: _new_acc(len(toks), domains, n_logits) for j in ids}
        bar = tqdm(batches, desc="verify", unit="batch", disable=not progress)
        for start, stop in bar:  # pass 2: each candidate's interventions on this batch
            runs = [runner.run(m, toks[start:stop]) for m in range(2)]
            clean = [(r[0].cpu(), r[1]) for r in runs]
            for i, j in enumerate(ids):
                _accumulate(
                    acc[j], runner, w_dec[j][latents[j]], latents[j], clean, fs[start][..., i],
                    toks[start:stop], keep[start:stop], (start, stop),
                    float(scale[i]) * steer_factor,
                )  # fmt: skip
    out: dict[int, dict[str, Any]] = {}
    for i, j in enumerate(ids):
        out[j] = _finish(acc[j], names, latents[j], domain_names, n_boot, seed + j, tokenizer,
                         _token_text, min_ratio)  # fmt: skip
        out[j]["steer_scale"] = float(scale[i]) * steer_factor
    return out


def _site_deltas(vec: Tensor, acts: list[Tensor], coef: Tensor) -> list[Tensor]:
    """Per site, coef[..., None] * the site's slice of `vec` (cut or zero-padded to the model)."""
    widths = [a.shape[-1] for a in acts]
    full = torch.zeros(sum(widths))
    n = min(len(full), len(vec))
    full[:n] = vec[:n]
    return [coef[..., None] * part for part in full.split(widths)]


def _new_acc(n_rows: int, domains: Tensor, n_logits: int) -> dict[str, Any]:
    def block() -> dict[str, Any]:
        return {
            "ablation_kl": (torch.zeros(n_rows), torch.zeros(n_rows)),
            "steering_kl": (torch.zeros(n_rows), torch.zeros(n_rows)),
            "delta_ce": {"ablation": torch.zeros(n_rows), "steering": torch.zeros(n_rows)},
            "logits": None,
            "n_positions": 0.0,
        }

    return {"own": block(), "control": block(), "domains": domains, "n_logits": n_logits}


def _accumulate(
    acc: dict, runner: _Runner, vec: Tensor, owner: int, clean: list, f: Tensor, t: Tensor,
    keep: Tensor, span: tuple[int, int], steer: float,
) -> None:  # fmt: skip
    """One batch of one latent: ablation and steering with its decoder vector `vec` (its own
    model's) in its model and, as the control, in the other model."""
    start, stop = span
    k = keep.float()
    fires = (f > 0).float()
    for role, m in (("own", owner), ("control", 1 - owner)):
        block = acc[role]
        logits, acts = clean[m]
        ce_clean = _ce(logits, t)
        for kind, coef in (("ablation", -f), ("steering", k * steer)):
            patched = runner.run(m, t, _site_deltas(vec, acts, coef))[0].cpu()
            kl = _kl(logits, patched)
            weight = fires if kind == "ablation" else k
            sums, counts = block[f"{kind}_kl"]
            sums[start:stop] = (kl * weight).sum(1)
            counts[start:stop] = weight.sum(1)
            block["delta_ce"][kind][start:stop] = (_ce(patched, t) - ce_clean).mean(1)
            if kind == "steering":
                moved = ((patched - logits) * k[..., None]).sum((0, 1))
                block["logits"] = moved if block["logits"] is None else block["logits"] + moved
                block["n_positions"] += float(k.sum())


def _finish(
    acc: dict, names: tuple, owner: int, domain_names: tuple, n_boot: int, seed: int,
    tokenizer: Any, token_text: Any, min_ratio: float,
) -> dict[str, Any]:  # fmt: skip
    """The per-latent record: effects, intervals, verdict, per-domain loss change, logits."""
    own, ctrl = acc["own"], acc["control"]
    rec: dict[str, Any] = {"model": names[owner], "control_model": names[1 - owner]}
    verdicts = []
    for key in ("ablation_kl", "steering_kl"):
        (s_own, n_own), (s_ctrl, n_ctrl) = own[key], ctrl[key]
        rows = (n_own > 0).numpy()
        a = (s_own / n_own.clamp_min(1)).numpy()[rows]
        b = (s_ctrl / n_ctrl.clamp_min(1)).numpy()[rows]
        diff = a - b
        lo, hi = bootstrap_mean_ci(diff, n_boot=n_boot, seed=seed)
        rec[key] = float(s_own.sum() / max(float(n_own.sum()), 1.0))
        rec[f"{key}_control"] = float(s_ctrl.sum() / max(float(n_ctrl.sum()), 1.0))
        rec[f"{key}_diff_ci"] = [lo, hi]
        rec[f"{key}_rows"] = int(rows.sum())
        big = rec[key] >= min_ratio * rec[f"{key}_control"]
        verdicts.append(lo is not None and lo > 0 and big)
    rec["verified"] = bool(all(verdicts))
    domains = acc["domains"].numpy()
    for kind in ("ablation", "steering"):
        for role, block in (("", own), ("_control", ctrl)):
            values = block["delta_ce"][kind].numpy()
            rec[f"delta_ce_{kind}{role}"] = float(values.mean())
            if domain_names:
                rec[f"delta_ce_{kind}{role}_per_domain"] = {
                    d: (float(values[domains == di].mean()) if (domains == di).any() else None)
                    for di, d in enumerate(domain_names)
                }
    k = acc["n_logits"]
    for role, block in (("own", own), ("control", ctrl)):
        moved = block["logits"] / max(block["n_positions"], 1.0)
        kk = min(k, moved.numel())
        top, bottom = moved.topk(kk), (-moved).topk(kk)
        rec[f"steering_logits_{role}"] = {
            "up": [[token_text(tokenizer, int(t)), round(float(v), 4)]
                   for t, v in zip(top.indices, top.values, strict=True)],
            "down": [[token_text(tokenizer, int(t)), round(-float(v), 4)]
                     for t, v in zip(bottom.indices, bottom.values, strict=True)],
        }  # fmt: skip
    return rec


VERIFY_COLUMNS = (
    "verify_candidate", "verified", "verify_ablation_kl", "verify_ablation_kl_control",
    "verify_steering_kl", "verify_steering_kl_control", "verify_delta_ce_ablation",
    "verify_delta_ce_ablation_control",
)  # fmt: skip


def add_verification(diff: Any, results: dict[int, dict[str, Any]], settings: dict) -> None:
    """Put the verification into a FeatureDiff: latent-table columns, summary["verification"]
    (method, per-class verified share with a Wilson interval, per-latent records)."""
    table = diff.table
    table["verify_candidate"] = table["latent"].isin(list(results))
    table["verified"] = pd_verified(table, results)
    for col in VERIFY_COLUMNS[2:]:
        key = col.removeprefix("verify_")
        values = np.full(len(table), np.nan)
        for j, rec in results.items():
            values[j] = rec[key]
        table[col] = values
    per_class = {}
    for cls in dict.fromkeys(table.loc[table["verify_candidate"], "class"]):
        if cls in (DEAD, SHARED, DESIGNATED):
            continue
        ids = [j for j in results if table.at[j, "class"] == cls]
        n_ok = sum(bool(results[j]["verified"]) for j in ids)
        lo, hi = wilson_interval(n_ok, len(ids))
        per_class[cls] = {
            "n_candidates": len(ids),
            "n_verified": n_ok,
            "share_verified": n_ok / len(ids) if ids else None,
            "interval_95": [lo, hi],
        }
    diff.summary["verification"] = {
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "score": SCORE,
        "settings": settings,
        "per_class": per_class,
        "latents": {str(j): rec for j, rec in results.items()},
    }
    sentences = [
        f"screen-and-verify: {v['n_verified']} of {v['n_candidates']} {cls} candidates verified "
        f"(share {v['share_verified']:.2f}, 95% interval {v['interval_95'][0]:.2f}-"
        f"{v['interval_95'][1]:.2f})"
        for cls, v in per_class.items()
        if v["n_candidates"]
    ]
    diff.summary.setdefault("sentences", []).extend(sentences)


def pd_verified(table: Any, results: dict[int, dict[str, Any]]) -> Any:
    """The `verified` column: True/False for candidates, None (not screened) for the rest."""
    values = np.full(len(table), None, dtype=object)
    for j, rec in results.items():
        values[j] = bool(rec["verified"])
    return values
