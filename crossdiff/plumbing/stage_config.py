"""The stage contract's shared part: every stage's typed config is built from a preset's dict.

Each stage package has a `stage.py` with one frozen config dataclass (a `StageConfig`) and one
`run_<stage>_stage(config, inputs, out_dir, ...)`. `crossdiff run` (crossdiff/run/pipeline.py)
builds the config with `from_options(RUN_PRESETS[preset][stage] + overrides)`; the stage's
subcommand builds it from its arguments (`from_args`) after `--preset` filled them. Both call
the same `run`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, ClassVar, TypeVar

from crossdiff.plumbing.common import CrossdiffError

C = TypeVar("C", bound="StageConfig")


class StageConfig:
    """Mixin for a stage's frozen config dataclass; `STAGE` is its name in a run's options."""

    STAGE: ClassVar[str] = ""

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_options(cls: type[C], options: dict[str, Any]) -> C:
        """The config for a preset's (or a run's) options of this stage; unknown names refused."""
        names = cls.option_names()
        unknown = sorted(set(options) - names)
        if unknown:
            raise CrossdiffError(
                f"{cls.STAGE}: unknown option(s) {unknown}; known: {sorted(names)} "
                f"(the fields of {cls.__module__}.{cls.__name__})"
            )
        return cls(**{k: v for k, v in options.items() if v is not None})

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace, dests: dict[str, str]) -> C:
        """The config for a subcommand's arguments (option -> its dest); unset ones (None) keep
        the config's defaults."""
        return cls.from_options({key: getattr(args, dest, None) for key, dest in dests.items()})
