"""The report stage (feature diff + report): its config and its `run`, called by
`crossdiff report` and by `crossdiff run`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossdiff.analysis.experts import DEFAULT_MIN_FIRINGS
from crossdiff.plumbing.stage_config import StageConfig


@dataclass(frozen=True)
class ReportStageConfig(StageConfig):
    """A run preset's "report" options, or report's flags."""

    STAGE = "report"

    split: str = "paper"  # class thresholds on the relative norm (paper 0.3/0.7, anchors 0.1/0.9)
    max_tokens: int | None = None
    splice_sequences: int | None = None  # held-out rows for the spliced-in loss (0: none)
    batch_size: int = 1024
    part: str | None = None  # default: the store's held-out part
    direction: tuple[str, str] | list[str] | None = None
    min_expert_firings: int = DEFAULT_MIN_FIRINGS
    # screen-and-verify: candidates per exclusive class (0: none) and held-out rows
    verify_candidates: int | None = None
    verify_sequences: int | None = None


@dataclass
class ReportInputs:
    """What the report reads: the crosscoder and its store; for text contexts the tokenizer; for
    the spliced-in loss and logit effects the models' folder and held-out token rows."""

    crosscoder: Any
    store: Any
    tokenizer: Any = None
    # a folder with a model folder per store model name, or {name: loaded model or folder}
    models_dir: Path | dict[str, Any] | None = None
    heldout: Any = None  # a TokenSet
    # more summary blocks from the diff (crossdiff run: the seeds' and the controls' comparison)
    extra_summary: Callable[[Any], dict[str, Any]] | None = None
    # where the spliced loss keeps its clean and ablated sums between reruns (None: not kept)
    cache_dir: Path | None = None
    # apply the crosscoder (and tokenizer) to a store it was not made for: a deliberate transfer
    # (crossdiff.crosscoder.compatibility), recorded in the report's summary["mismatch"]
    allow_mismatch: bool = False


def run_report_stage(
    config: ReportStageConfig,
    inputs: ReportInputs,
    out_dir: str | Path,
    *,
    device: Any = "cpu",
    show_progress: bool = True,
) -> tuple[Any, dict[str, Path]]:
    """Diff the crosscoder's latents on the store and write the report into `out_dir`;
    (the FeatureDiff, the report's paths)."""
    from crossdiff.analysis import diff_features
    from crossdiff.crosscoder.spliced_loss import SPLICE_SEQUENCES, spliced_loss_for_run
    from crossdiff.report import write_report

    diff = diff_features(
        inputs.crosscoder,
        inputs.store,
        tokenizer=inputs.tokenizer,
        split=config.split,
        direction=tuple(config.direction) if config.direction else None,
        max_tokens=config.max_tokens,
        batch_size=config.batch_size,
        min_expert_firings=config.min_expert_firings,
        part=config.part,
        show_progress=show_progress,
        allow_mismatch=inputs.allow_mismatch,
    )
    n_rows = SPLICE_SEQUENCES if config.splice_sequences is None else config.splice_sequences
    if n_rows > 0 and inputs.models_dir is not None and inputs.heldout is not None:
        spliced = spliced_loss_for_run(
            inputs.crosscoder,
            inputs.store,
            inputs.models_dir,
            inputs.heldout,
            max_sequences=n_rows,
            device=device,
            cache_dir=inputs.cache_dir,
        )
        if spliced is not None:
            diff.summary["spliced_loss"] = spliced
    if inputs.models_dir is not None and inputs.heldout is not None:
        from crossdiff.analysis.verify import DEFAULT_CANDIDATES, DEFAULT_SEQUENCES
        from crossdiff.analysis.verify_run import verify_for_run

        n_cand = config.verify_candidates
        n_seq = config.verify_sequences
        verify_for_run(
            diff, inputs.store, inputs.models_dir, inputs.heldout, device=device,
            n_candidates=DEFAULT_CANDIDATES if n_cand is None else n_cand,
            max_sequences=DEFAULT_SEQUENCES if n_seq is None else n_seq,
        )  # fmt: skip
    if inputs.extra_summary is not None:
        diff.summary.update(inputs.extra_summary(diff))
    paths = write_report(diff, out_dir, models=inputs.models_dir)
    return diff, paths
