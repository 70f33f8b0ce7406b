"""The crosscoder as a SAELens SAE: weights, BatchTopK selection, encode/decode, folding, save/load
(the sparse arithmetic is in sparse.py, the folder on disk in folder.py).

Shapes: x [batch, n_models, d_model]; latents f [batch, d_sae];
W_enc [n_models, d_model, d_sae], b_enc [d_sae], W_dec [d_sae, n_models, d_model],
b_dec [n_models, d_model].

pre = sum_m (x_m - b_dec_m) W_enc_m + b_enc;  x_hat_m = f W_dec[:, m] + b_dec_m.
A latent's selection score is ReLU(pre) * sum_m c_m ||W_dec[i, m]|| (or another code
normalization of those norms, cfg.code_normalization), divided by shared_penalty_ratio for the
first n_shared latents (unless cfg.shared_penalty is "sparsity"). c_m are the activation scaling
factors the weights were trained under (`scaling_factors`, ones until folded), so selection after
folding is exactly what it was in training. Training keeps the k * batch largest scores;
inference keeps every score above the learned global `threshold`.

Decoder storage: `W_dec_untied` [d_sae - n_tied, n_models, d_model] holds per-model vectors;
`W_dec_tied` [n_tied, d_model] holds one vector per tied shared latent, in the training
(scaled) units, so the tie is exact. `W_dec` is the combined view in raw units.

Models of different widths (`cfg.d_models`): every per-model tensor is padded to the widest,
d_model, and the coordinates beyond model m's width are exactly zero in W_enc[m], W_dec[:, m] and
b_dec[m]: zero at initialization, their gradients masked to zero (so Adam never moves them), and
checked on save and load. The padded part of an input is then never read (W_enc is zero there)
and the padded part of a reconstruction is exactly zero. Every consumer of W_dec [d_sae, n_models,
d_model] (norms, relative norms, latent scaling, FVE) sees the model's own width only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from sae_lens.saes.sae import SAE
from torch import Tensor, nn

from crossdiff.crosscoder.config import CrossCoderConfig
from crossdiff.crosscoder.folder import load_folder, save_folder
from crossdiff.crosscoder.masks import WeightMasks
from crossdiff.crosscoder.sparse import SelectedPreActivations, code_weights, selection_scores
from crossdiff.plumbing.common import CrossdiffError


class CrossCoderWeights(WeightMasks):
    """Weights and the maths shared by the inference and the training crosscoder (a mixin)."""

    cfg: CrossCoderConfig
    dtype: torch.dtype
    device: torch.device
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    W_dec_tied: nn.Parameter
    W_dec_untied: nn.Parameter
    threshold: Tensor
    scaling_factors: Tensor

    def initialize_weights(self) -> None:
        cfg = self.cfg
        kw = {"dtype": self.dtype, "device": self.device}
        init_norm = getattr(cfg, "decoder_init_norm", None) or 0.1
        tied = torch.randn(cfg.n_tied, cfg.d_model, **kw)
        untied = torch.randn(cfg.d_sae - cfg.n_tied, cfg.n_models, cfg.d_model, **kw)
        if cfg.padded:
            untied = untied * self.width_mask(untied)
        if cfg.dfc:  # a DFC: no model has a vector for another model's exclusive latents
            untied = untied * self.latent_mask(untied)[cfg.n_tied :, :, None]
        tied = tied / tied.norm(dim=-1, keepdim=True).clamp_min(1e-12) * init_norm
        untied = untied / untied.norm(dim=-1, keepdim=True).clamp_min(1e-12) * init_norm
        self.W_dec_tied = nn.Parameter(tied)
        self.W_dec_untied = nn.Parameter(untied)
        self.register_buffer("scaling_factors", torch.ones(cfg.n_models, **kw))
        # encoder = decoder transpose (per model), as SAELens and the crosscoder anchors
        self.W_enc = nn.Parameter(self.W_dec.detach().permute(1, 2, 0).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.n_models, cfg.d_model, **kw))
        self.register_buffer("threshold", torch.zeros((), **kw))
        if cfg.padded or cfg.dfc:
            self._mask_padding_gradients()

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        # new Parameter objects (SAELens loads this way) need the gradient masks again
        if assign and (self.cfg.padded or self.cfg.dfc):
            self._mask_padding_gradients()
        return result

    @property
    def W_dec(self) -> Float[Tensor, "d_sae n_models d_model"]:
        if self.cfg.n_tied == 0:
            return self.W_dec_untied
        tied = self.W_dec_tied[:, None, :] / self.scaling_factors[None, :, None]
        return torch.cat([tied, self.W_dec_untied], dim=0)

    @torch.no_grad()
    def decoder_norms(self, *, raw: bool = False) -> Float[Tensor, "d_sae n_models"]:
        """Per-latent, per-model decoder norms.

        By default in the units the crosscoder was trained in (activations scaled to mean norm
        sqrt(d_model) per model), so models with different activation norms compare fairly;
        `raw=True` gives the norms of `W_dec` as stored (raw-activation units).
        """
        norms = self.W_dec.norm(dim=-1)
        return norms if raw else norms * self.scaling_factors

    @torch.no_grad()
    def selection_weights(self) -> Float[Tensor, " d_sae"]:
        """What ReLU(pre) is multiplied by to give a latent's selection score: its code weight
        (cfg.code_normalization of its decoder norms), divided by shared_penalty_ratio for the
        designated shared latents when cfg.shared_penalty is "selection"."""
        cfg = self.cfg
        weights = code_weights(
            self.decoder_norms(), cfg.code_normalization, cfg.code_normalization_alpha
        )
        if cfg.n_shared and cfg.shared_penalty == "selection":
            weights[: cfg.n_shared] /= cfg.shared_penalty_ratio
        return weights

    def _check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        if x.ndim != 3 or x.shape[1] != cfg.n_models or x.shape[2] != cfg.d_model:
            padding = (
                f" (widths {list(cfg.widths)}: pad each narrower model with zeros to {cfg.d_model})"
                if cfg.padded
                else ""
            )
            raise CrossdiffError(
                f"crosscoder input has shape {tuple(x.shape)}; expected "
                f"[batch, n_models={cfg.n_models}, d_model={cfg.d_model}]{padding} (stack the "
                "models' activations on dim 1)"
            )

    def pre_activations(
        self, x: Float[Tensor, "batch n_models d_model"]
    ) -> Float[Tensor, "batch d_sae"]:
        self._check_input(x)
        x = self.hook_sae_input(x.to(self.dtype))
        flat_enc = self.W_enc.reshape(self.cfg.d_in, self.cfg.d_sae)
        # (x - b_dec) W = x W - b_dec W: b_dec's gradient then costs a vector, not a matmul
        x_flat = x.reshape(x.shape[0], -1)
        if torch.is_autocast_enabled(x.device.type):  # bfloat16 matmul, float32 bias and pre
            pre = x_flat @ flat_enc + self.encoder_bias()
        else:  # the bias added inside the GEMM: one pass over [batch, d_sae] fewer
            pre = torch.addmm(self.encoder_bias(), x_flat, flat_enc)
        return self.hook_sae_acts_pre(pre)

    def encoder_bias(self) -> Float[Tensor, " d_sae"]:
        """b_enc, less b_dec W_enc when the decoder bias is subtracted from the input."""
        if not self.cfg.apply_b_dec_to_input:
            return self.b_enc
        return self.b_enc - self.b_dec.reshape(-1) @ self.W_enc.reshape(self.cfg.d_in, -1)

    @torch.no_grad()
    def select_batch_topk(
        self, pre: Float[Tensor, "batch d_sae"], k: float
    ) -> tuple[Int[Tensor, " n_selected"], Float[Tensor, " n_selected"]]:
        """BatchTopK: flat indices (sorted, so grouped by token) and scores of the kept latents."""
        scores = selection_scores(pre, self.selection_weights())
        n_keep = min(max(int(k * pre.shape[0]), 1), scores.numel())
        # Exact shortcut: if at least n_keep scores exceed half the running threshold, the top
        # n_keep are all among them, and topk over those few is much cheaper than over all.
        # CPU only: on an accelerator, reading the threshold and the count would stall the queue.
        floor = 0.5 * float(self.threshold) if scores.device.type == "cpu" else 0.0
        if floor > 0:
            candidates = (scores > floor).nonzero().squeeze(1)
            if candidates.numel() >= n_keep:
                top = scores[candidates].topk(n_keep, sorted=False)
                indices = candidates[top.indices].sort().values
                return indices, scores[indices]
        top = scores.topk(n_keep, sorted=False)
        indices = top.indices.sort().values
        return indices, scores[indices]

    def selected_pre_activations(
        self,
        pre: Float[Tensor, "batch d_sae"],
        x: Float[Tensor, "batch n_models d_model"],
        rows: Int[Tensor, " n_selected"],
        latents: Int[Tensor, " n_selected"],
    ) -> Float[Tensor, " n_selected"]:
        """pre[rows, latents] with a gradient to W_enc, b_enc and b_dec that only touches the
        selected entries (a sparse matmul instead of a dense [d_in, batch] x [batch, d_sae])."""
        cfg = self.cfg
        x_flat = x.to(self.dtype).reshape(x.shape[0], -1)
        if cfg.apply_b_dec_to_input:
            x_flat = x_flat - self.b_dec.detach().reshape(1, -1)
        return SelectedPreActivations.apply(
            pre.detach()[rows, latents],
            x_flat.detach(),
            self.W_enc.reshape(cfg.d_in, cfg.d_sae),
            self.b_enc,
            self.b_dec.reshape(-1),
            rows,
            latents,
            cfg.apply_b_dec_to_input,
        )

    def decode_sparse(
        self,
        flat_indices: Int[Tensor, " n_selected"],
        values: Float[Tensor, " n_selected"],
        batch: int,
    ) -> Float[Tensor, "batch n_models d_model"]:
        """Decode only the selected latents: `flat_indices` index a [batch, d_sae] grid, sorted."""
        cfg = self.cfg
        rows = flat_indices // cfg.d_sae
        latents = flat_indices % cfg.d_sae
        counts = torch.bincount(rows, minlength=batch)
        offsets = counts.cumsum(0) - counts
        flat_dec = self.W_dec.reshape(cfg.d_sae, cfg.d_in)
        out = F.embedding_bag(
            latents, flat_dec, offsets, mode="sum", per_sample_weights=values.to(flat_dec.dtype)
        )
        return out.view(batch, cfg.n_models, cfg.d_model) + self.b_dec

    def encode_topk(
        self, x: Float[Tensor, "batch n_models d_model"], k: float | None = None
    ) -> Float[Tensor, "batch d_sae"]:
        """Latents by BatchTopK on this batch (the training rule): exactly k * batch active."""
        pre = self.pre_activations(x)
        flat, _ = self.select_batch_topk(pre, float(self.cfg.k if k is None else k))
        acts = torch.zeros_like(pre).flatten()
        acts[flat] = pre.flatten()[flat].relu()
        return self.hook_sae_acts_post(acts.view_as(pre))

    def encode_threshold(
        self, x: Float[Tensor, "batch n_models d_model"]
    ) -> Float[Tensor, "batch d_sae"]:
        """Latents by the learned global threshold: no dependence on the rest of the batch."""
        acts = self.pre_activations(x).relu()
        keep = acts * self.selection_weights() > self.threshold
        return self.hook_sae_acts_post(torch.where(keep, acts, torch.zeros_like(acts)))

    def decode_dense(
        self, f: Float[Tensor, "batch d_sae"]
    ) -> Float[Tensor, "batch n_models d_model"]:
        cfg = self.cfg
        if f.ndim != 2 or f.shape[1] != cfg.d_sae:
            raise CrossdiffError(
                f"latents have shape {tuple(f.shape)}; expected [batch, {cfg.d_sae}]"
            )
        out = f.to(self.dtype) @ self.W_dec.reshape(cfg.d_sae, cfg.d_in)
        out = out.view(f.shape[0], cfg.n_models, cfg.d_model) + self.b_dec
        return self.hook_sae_recons(out)

    @torch.no_grad()
    def fold_scaling_factors(self, factors: Float[Tensor, " n_models"]) -> Any:
        """Make weights trained on x_m * factors[m] work on raw x_m, with identical latents, in
        place; returns the crosscoder. Its reconstructions are then the scaled ones divided by
        factors[m].

        The selection score keeps its training units through `scaling_factors`, so the
        threshold needs no change; the decoder bias is folded along with the decoder.
        """
        c = factors.to(self.W_enc.device, self.W_enc.dtype)
        if c.shape != (self.cfg.n_models,) or not bool((c > 0).all()):
            raise CrossdiffError(
                f"scaling factors {c.tolist()} must be {self.cfg.n_models} positive numbers"
            )
        self.W_enc.mul_(c[:, None, None])
        self.W_dec_untied.div_(c[None, :, None])
        self.b_dec.div_(c[:, None])
        self.scaling_factors.mul_(c)
        return self

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        self.fold_scaling_factors(torch.full((self.cfg.n_models,), float(scaling_factor)))
        self.cfg.normalize_activations = "none"

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(
            "a crosscoder's decoder norms carry the shared/exclusive signal; they are not folded"
        )

    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        return {"weights/W_dec_norms": self.decoder_norms().sum(-1).float().cpu().numpy()}


class CrossCoder(CrossCoderWeights, SAE[CrossCoderConfig]):
    """Inference crosscoder: `encode` uses the learned threshold, so it needs no batch."""

    def __init__(self, cfg: CrossCoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def encode(
        self, x: Float[Tensor, "batch n_models d_model"] | Float[Tensor, "*batch d_in"]
    ) -> Float[Tensor, "*batch d_sae"]:
        """Latents of [batch, n_models, d_model], or (SAELens's convention, `cfg.d_in` wide) of the
        models' vectors concatenated: [..., n_models * d_model] gives [..., d_sae]."""
        stacked, lead = flat_to_stacked(x, self.cfg)
        self._check_input(stacked)
        f = self.encode_threshold(stacked)
        return f if lead is None else f.reshape(*lead, self.cfg.d_sae)

    def decode(
        self, feature_acts: Float[Tensor, "*batch d_sae"]
    ) -> Float[Tensor, "*batch n_models d_model"]:
        """[..., d_sae] latents to [..., n_models, d_model]; `decode_flat` gives [..., d_in]."""
        lead = feature_acts.shape[:-1]
        out = self.decode_dense(feature_acts.reshape(-1, feature_acts.shape[-1]))
        return out.reshape(*lead, self.cfg.n_models, self.cfg.d_model)

    def decode_flat(
        self, feature_acts: Float[Tensor, "*batch d_sae"]
    ) -> Float[Tensor, "*batch d_in"]:
        """The reconstruction with the models' vectors concatenated: [..., n_models * d_model]."""
        return self.decode(feature_acts).flatten(-2)

    def forward(
        self, x: Float[Tensor, "batch n_models d_model"] | Float[Tensor, "*batch d_in"]
    ) -> Tensor:
        """SAELens's `sae(x)`: the reconstruction in the shape of `x` (stacked or flat)."""
        stacked, lead = flat_to_stacked(x, self.cfg)
        self._check_input(stacked)
        out = super().forward(stacked)
        return out if lead is None else out.reshape(*lead, self.cfg.d_in)

    def save(self, path: str | Path) -> Path:
        """Write `path/cfg.json` and `path/sae_weights.safetensors` (SAELens names) and the
        weights' checksum `sae_weights.safetensors.sha256`, each file replaced atomically."""
        return save_folder(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | None = None) -> CrossCoder:
        """The crosscoder saved in `path` (checksum, finiteness and padding checked)."""
        return load_folder(path, cls, device=device, dtype=dtype)


def flat_to_stacked(x: Tensor, cfg: Any) -> tuple[Tensor, tuple[int, ...] | None]:
    """[batch, n_models, d_model] as it is (None); flat [..., n_models * d_model] as
    [prod(...), n_models, d_model] with its leading shape; any other shape as it is (for the
    caller's `_check_input` to say what was expected)."""
    n, d = int(cfg.n_models), int(cfg.d_model)
    if x.ndim == 3 and tuple(x.shape[1:]) == (n, d):
        return x, None
    if x.ndim >= 1 and x.shape[-1] == n * d:
        return x.reshape(-1, n, d), tuple(x.shape[:-1])
    return x, None
