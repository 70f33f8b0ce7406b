"""Configuration of a crosscoder: the inference config and the training config, SAELens-style.

`CrossCoderConfig` is a `sae_lens.SAEConfig` (what `cfg.json` holds); `TrainingCrossCoderConfig`
adds what only training needs (auxiliary loss, threshold moving average, k annealing). SAELens's
`d_in` is derived: `n_models * d_model`.

Models of different widths: `d_models=(48, 32)` gives each model its own width; `d_model` is then
the widest, and every per-model tensor is padded to it with coordinates that stay exactly zero
(see model.py and docs/crosscoder.md, "Widths").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from sae_lens.saes.sae import SAEConfig, SAEMetadata, TrainingSAEConfig

from crossdiff.activations.source import ActivationSource
from crossdiff.crosscoder.partition import latent_owner, partition_ranges, resolve_partition
from crossdiff.plumbing.api_checks import check_whole
from crossdiff.plumbing.common import CrossdiffError, refuse_float16_training

# namespaced: "crosscoder" alone is generic enough for another plugin to claim it
ARCHITECTURE = "crossdiff.crosscoder"

SHARED_DECODER_MODES = ("free", "tied")
# A latent's code weight (its selection score's factor) from its per-model decoder norms n_m:
# "sum" = sum_m n_m (crosscoder), "concat" = sqrt(sum_m n_m^2) (the norm of the concatenated
# decoder, as a plain SAE), "mixed" = alpha * concat + (1 - alpha) * sum.
CODE_NORMALIZATIONS = ("sum", "concat", "mixed")
# How designated shared latents are made cheaper: "selection" divides their selection score by
# shared_penalty_ratio; "sparsity" adds the fork's decoder-norm penalties to the loss instead.
SHARED_PENALTIES = ("selection", "sparsity")
THRESHOLD_SCHEDULES = ("rate", "ema")
AUX_LOSSES = ("saelens", "fork")
RECON_LOSSES = ("mse", "l2")
B_DEC_INITS = ("mean", "geometric_median")
# crosscoder architectures: "standard" (every latent reads and writes every model) and "dfc"
# (Dedicated Feature Crosscoder: `partition` gives each model latents only it reads and writes)

# Fields added after cfg.json's first format, with their defaults. They are written only when
# they differ from the default, so the cfg.json and the run identity of a run that does not use
# them stay exactly what they were (and a checkpoint written before them still resumes).
_OPTIONAL_FIELDS: dict[str, Any] = {
    "code_normalization": "sum",
    "code_normalization_alpha": 0.7,
    "shared_penalty": "selection",
    "shared_sparsity_coefficient": None,
    "sparsity_coefficient": None,
    "threshold_schedule": "rate",
    "threshold_beta": 0.999,
    "threshold_start_step": 1000,
    "aux_loss": "saelens",
    "recon_loss": "mse",
    "b_dec_init": "mean",
    "partition": None,
}

# the names of the fork's options (train_crosscoder keywords, run-preset keys, CLI flags); a
# DFC's partition is set through the crosscoder stage's architecture and dfc_exclusive instead
FORK_OPTION_NAMES = tuple(name for name in _OPTIONAL_FIELDS if name != "partition")


def _check_choice(name: str, value: Any, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise CrossdiffError(f"{name}={value!r}; expected one of {choices} ({what})")


@dataclass(kw_only=True)
class CrossCoderConfig(SAEConfig):
    """A BatchTopK crosscoder over `n_models` activation spaces of width `d_model`, or of
    widths `d_models` (one per model; `d_model` is then their maximum, filled in if left out).

    The first `n_shared` latents are shared by design. With `shared_decoder="tied"` each of them
    has one decoder vector used for every model; with `"free"` each model keeps its own vector
    and only the activation is shared. Their BatchTopK selection score is divided by
    `shared_penalty_ratio` (see docs/crosscoder.md), so a ratio below 1 makes them cheaper;
    with `shared_penalty="sparsity"` their score is not divided and training adds decoder-norm
    penalties instead (TrainingCrossCoderConfig).

    code_normalization: how a latent's per-model decoder norms weight its selection score:
    "sum" (crosscoder, the default), "concat" (norm of the concatenated decoder) or "mixed"
    (code_normalization_alpha * concat + (1 - code_normalization_alpha) * sum).

    partition: a Dedicated Feature Crosscoder (DFC; Jiralerspong & Bricken, arXiv 2602.11729):
    the number of latents exclusive to each model, one count per model (or one fraction of d_sae
    for every model, e.g. 0.05). Model m's exclusive latents are read and written by model m
    only: the other models' encoder and decoder weights of those latents are zero and their
    gradients masked (the auxiliary loss included); the encoder bias is not masked. They sit at
    the end of the dictionary, model 0's first; the latents before them are shared
    (`partition_ranges`). None: a standard crosscoder.
    """

    d_in: int = 0  # derived: n_models * d_model
    d_sae: int = 0
    n_models: int = 2
    d_model: int = 0
    d_models: tuple[int, ...] | list[int] | None = None  # None: every model has width d_model
    k: int | float = 32
    n_shared: int = 0
    shared_decoder: str = "free"
    shared_penalty_ratio: int | float = 0.7
    shared_penalty: str = "selection"
    code_normalization: str = "sum"
    code_normalization_alpha: int | float = 0.7
    partition: tuple[int, ...] | list[int] | float | None = None
    # SAELens's from_dict passes the metadata as a dict first and replaces it afterwards
    metadata: SAEMetadata | dict[str, Any] = field(default_factory=SAEMetadata)

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata(**self.metadata)
        self._check_types()
        super().__post_init__()
        if self.n_models < 2:
            raise CrossdiffError(
                f"n_models={self.n_models}: a crosscoder reads at least 2 models; "
                "for one model use an ordinary SAE"
            )
        if self.d_models is not None:
            self._check_d_models()
        if self.d_model < 1:
            raise CrossdiffError(
                f"d_model={self.d_model}: pass the activation width of the models, "
                "e.g. CrossCoderConfig(d_model=256, d_sae=4096, k=32)"
            )
        expected_d_in = self.n_models * self.d_model
        if self.d_in == 0:
            self.d_in = expected_d_in
        elif self.d_in != expected_d_in:
            raise CrossdiffError(
                f"d_in={self.d_in} but n_models * d_model = {expected_d_in}; "
                "leave d_in out, crossdiff derives it"
            )
        if self.d_sae < 1:
            raise CrossdiffError(f"d_sae={self.d_sae}: pass the number of latents (>= 1)")
        if not 0 < self.k <= self.d_sae:
            raise CrossdiffError(
                f"k={self.k} must be in (0, d_sae={self.d_sae}]: k is the mean number of "
                "active latents per token; lower k or raise d_sae"
            )
        if not 0 <= self.n_shared < self.d_sae:
            raise CrossdiffError(
                f"n_shared={self.n_shared} must be in [0, d_sae={self.d_sae}): the shared "
                "latents are the first n_shared of d_sae; lower n_shared or raise d_sae"
            )
        if self.shared_decoder not in SHARED_DECODER_MODES:
            raise CrossdiffError(
                f"shared_decoder={self.shared_decoder!r}; expected one of {SHARED_DECODER_MODES}"
            )
        if not (self.shared_penalty_ratio > 0 and math.isfinite(self.shared_penalty_ratio)):
            raise CrossdiffError(
                f"shared_penalty_ratio={self.shared_penalty_ratio} must be a positive number "
                "(paper: 0.7; Anthropic: 0.1-0.2; 1.0 = no preference)"
            )
        self._check_code_options()
        if self.partition is not None:
            self._check_partition()

    def _check_partition(self) -> None:
        self.partition = resolve_partition(self.partition, self.d_sae, self.n_models, self.n_shared)

    @property
    def dfc(self) -> bool:
        """Whether this is a Dedicated Feature Crosscoder (a partition is set)."""
        return self.partition is not None

    def partition_ranges(self) -> list[tuple[int, int]]:
        """Per model, the [start, stop) of its exclusive latents (empty for a standard
        crosscoder); the latents below the first start are shared."""
        return partition_ranges(self.partition, self.d_sae)

    def latent_owner(self) -> list[int]:
        """Per latent, the model it is exclusive to, or -1 for a latent every model uses."""
        return latent_owner(self.partition, self.d_sae)

    def _check_code_options(self) -> None:
        _check_choice(
            "code_normalization", self.code_normalization, CODE_NORMALIZATIONS,
            "how decoder norms weight a latent's selection score",
        )  # fmt: skip
        alpha = self.code_normalization_alpha
        if not (isinstance(alpha, numbers.Real) and 0 <= alpha <= 1):
            raise CrossdiffError(
                f"code_normalization_alpha={alpha!r} must be in [0, 1]: the weight of the "
                "concatenated-decoder norm in code_normalization='mixed' (the fork: 0.7)"
            )
        _check_choice(
            "shared_penalty", self.shared_penalty, SHARED_PENALTIES,
            "'selection' divides shared latents' scores by shared_penalty_ratio; 'sparsity' "
            "adds the fork's decoder-norm penalties to the loss",
        )  # fmt: skip

    def _check_types(self) -> None:
        """Whole numbers where sizes go and real numbers for k and the ratios, before any
        comparison (d_sae='64' would otherwise fail inside SAELens or with a TypeError)."""
        owner = type(self).__name__
        for name in ("d_in", "d_sae", "n_models", "d_model", "n_shared"):
            check_whole(getattr(self, name), name, owner, minimum=None)  # ranges: below
        for name in ("k", "shared_penalty_ratio", "code_normalization_alpha"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise CrossdiffError(f"{owner}: {name} must be a number, got {value!r}")

    def _check_d_models(self) -> None:
        widths = list(self.d_models or ())
        if len(widths) != self.n_models or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 for w in widths
        ):
            raise CrossdiffError(
                f"d_models={self.d_models}: give one positive integer width per model "
                f"(n_models={self.n_models}), e.g. d_models=(48, 32)"
            )
        if self.d_model == 0:
            self.d_model = max(widths)
        elif self.d_model != max(widths):
            raise CrossdiffError(
                f"d_model={self.d_model} but the widest of d_models={widths} is {max(widths)}; "
                "d_model is the padded width, the largest of d_models: leave it out"
            )
        self.d_models = tuple(int(w) for w in widths)
        if self.shared_decoder == "tied" and len(set(widths)) > 1:
            raise CrossdiffError(
                f"shared_decoder='tied' needs one activation space for all models, but "
                f"d_models={widths} differ; use shared_decoder='free' (each model keeps its own "
                "decoder vector of its own width)"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """Each model's own activation width (d_model for every model unless d_models says)."""
        if self.d_models is None:
            return (self.d_model,) * self.n_models
        return tuple(self.d_models)

    @property
    def padded(self) -> bool:
        """Whether some model is narrower than d_model (its extra coordinates are held at 0)."""
        return any(w != self.d_model for w in self.widths)

    def to_dict(self) -> dict[str, Any]:
        # equal widths: cfg.json and run identities stay exactly what they were before d_models
        out = super().to_dict()
        if out.get("d_models") is None:
            out.pop("d_models", None)
        else:
            out["d_models"] = list(out["d_models"])
        for name, default in _OPTIONAL_FIELDS.items():
            if name in out and out[name] == default:
                del out[name]
        if out.get("partition") is not None:
            out["partition"] = list(out["partition"])
        return out

    @property
    def n_tied(self) -> int:
        """How many latents have one decoder vector for all models."""
        return self.n_shared if self.shared_decoder == "tied" else 0


@dataclass(kw_only=True)
class TrainingCrossCoderConfig(CrossCoderConfig, TrainingSAEConfig):
    """`CrossCoderConfig` plus what training needs.

    aux_loss_coefficient: weight of the auxiliary top-k loss on dead latents (applied once).
    k_aux: dead latents used per token by that loss (default d_in // 2, as SAELens).
    threshold_lr: moving-average rate of the inference threshold (smallest selected score).
    k_anneal_start, k_anneal_steps: BatchTopK k goes linearly from k_anneal_start to k over the
        first k_anneal_steps steps (0 = no annealing).

    Options after the seed paper's fork of dictionary_learning (docs/crosscoder.md has the table);
    each default is crossdiff's own behaviour:
    shared_sparsity_coefficient, sparsity_coefficient: with shared_penalty="sparsity", the loss
        adds lambda_s * sum_i f_i ||mean_m d_m,i|| over designated latents and lambda_f *
        sum_i f_i sum_m ||d_m,i|| over the others (batch means); defaults 0.15 *
        aux_loss_coefficient and aux_loss_coefficient, as the fork.
    threshold_schedule: "rate" (moving average at threshold_lr from step 0) or "ema" (after step
        threshold_start_step: first set to the smallest selected score, then threshold_beta *
        threshold + (1 - threshold_beta) * smallest).
    aux_loss: "saelens" (k_aux = d_in // 2, top pre-activations, scaled by min(n_dead / k_aux,
        1)) or "fork" (k_aux = per-model width // 2, top code-weighted activations, divided by
        the residual's variance).
    recon_loss: "mse" (squared error summed over models and width, batch mean) or "l2" (the
        fork: the L2 norm of each model's error, mean over tokens and models).
    b_dec_init: "mean" or "geometric_median" of the sample that sets the decoder bias.
    """

    aux_loss_coefficient: int | float = 1 / 32
    k_aux: int | None = None
    threshold_lr: int | float = 0.01
    k_anneal_start: int | float | None = None
    k_anneal_steps: int = 0
    shared_sparsity_coefficient: int | float | None = None
    sparsity_coefficient: int | float | None = None
    threshold_schedule: str = "rate"
    threshold_beta: int | float = 0.999
    threshold_start_step: int = 1000
    aux_loss: str = "saelens"
    recon_loss: str = "mse"
    b_dec_init: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_float16_training(self.dtype, "a crosscoder", "dtype")
        if self.k_anneal_steps < 0:
            raise CrossdiffError(f"k_anneal_steps={self.k_anneal_steps} must be >= 0")
        start = self.k_anneal_start
        if start is not None and not self.k <= start <= self.d_sae:
            raise CrossdiffError(
                f"k_anneal_start={start} must lie in [k={self.k}, d_sae={self.d_sae}]"
            )
        self._check_fork_options()
        self._resolve_sparsity_coefficients()

    def _check_fork_options(self) -> None:
        _check_choice(
            "threshold_schedule", self.threshold_schedule, THRESHOLD_SCHEDULES,
            "'rate': moving average from step 0; 'ema': the fork's, after threshold_start_step",
        )  # fmt: skip
        if not (isinstance(self.threshold_beta, numbers.Real) and 0 <= self.threshold_beta < 1):
            raise CrossdiffError(
                f"threshold_beta={self.threshold_beta!r} must be in [0, 1) (the fork: 0.999)"
            )
        start = self.threshold_start_step
        if not (isinstance(start, numbers.Integral) and not isinstance(start, bool) and start >= 0):
            raise CrossdiffError(f"threshold_start_step={start!r} must be an integer >= 0")
        _check_choice("aux_loss", self.aux_loss, AUX_LOSSES, "the dead-latent loss")
        _check_choice("recon_loss", self.recon_loss, RECON_LOSSES, "the reconstruction loss")
        _check_choice("b_dec_init", self.b_dec_init, B_DEC_INITS, "the decoder bias at step 0")
        for name in ("shared_sparsity_coefficient", "sparsity_coefficient"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.shared_penalty != "sparsity":
                raise CrossdiffError(
                    f"{name}={value} applies only with shared_penalty='sparsity' (it is "
                    f"{self.shared_penalty!r}); set shared_penalty='sparsity' or leave {name} out"
                )
            if not (isinstance(value, numbers.Real) and value >= 0 and math.isfinite(value)):
                raise CrossdiffError(f"{name}={value!r} must be a finite number >= 0")

    def _resolve_sparsity_coefficients(self) -> None:
        if self.shared_penalty != "sparsity":
            return
        if self.sparsity_coefficient is None:
            self.sparsity_coefficient = float(self.aux_loss_coefficient)
        if self.shared_sparsity_coefficient is None:
            self.shared_sparsity_coefficient = 0.15 * float(self.aux_loss_coefficient)

    def k_at_step(self, step: int) -> float:
        start = self.k_anneal_start
        if start is None or self.k_anneal_steps == 0 or step >= self.k_anneal_steps:
            return float(self.k)
        return float(start + (self.k - start) * step / self.k_anneal_steps)

    def inference_config(self) -> CrossCoderConfig:
        return CrossCoderConfig.from_dict(self.get_inference_sae_cfg_dict())

    @classmethod
    def from_inference_config(
        cls, cfg: CrossCoderConfig, **training: object
    ) -> TrainingCrossCoderConfig:
        fields = {k: v for k, v in cfg.to_dict().items() if k not in ("architecture", "metadata")}
        metadata = SAEMetadata(**cfg.metadata.to_dict())
        return cls(**fields, metadata=metadata, **training)  # type: ignore[arg-type]


def store_widths(store: ActivationSource) -> tuple[int, ...] | None:
    """A store's per-model widths for `CrossCoderConfig(d_models=...)`: None when they are equal
    (so an equal-width config, its cfg.json and its run identity stay as they always were)."""
    widths = tuple(int(w) for w in store.d_models)
    return widths if len(set(widths)) > 1 else None


def default_lr(d_sae: int) -> float:
    """Learning rate by dictionary size, as the anchors: 2e-4 / sqrt(d_sae / 2**14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
