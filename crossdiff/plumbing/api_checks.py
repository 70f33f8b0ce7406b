"""Checks of what a caller passes to the public API (the names in crossdiff/__init__.py).

A value of the wrong type or out of range is a CrossdiffError that names the function, the
argument, what was given and what to pass, instead of an AttributeError or a TypeError from
deep inside torch or SAELens. Each check is one isinstance or comparison, so calling them on
every public call costs nothing measurable. (Tests also run beartype over crossdiff's
annotations through jaxtyping's pytest hook; these checks are what a user meets without it.)
The check of an activations argument needs the ActivationSource class, so it lives beside it:
crossdiff.activations.source.check_activations.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from crossdiff.plumbing.common import CrossdiffError


def given(value: Any) -> str:
    """What the caller gave, for an error message: a short repr and its type."""
    if value is None:
        return "None"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} (a {type(value).__name__})"


def check_crosscoder(cc: Any, function: str, name: str = "cc") -> None:
    """`cc` is a crosscoder: it has a decoder (W_dec) and a config (cfg)."""
    if cc is not None and hasattr(cc, "W_dec") and hasattr(cc, "cfg"):
        return
    hint = ""
    if isinstance(cc, (str, os.PathLike)):
        hint = "; to use a saved one, load it first: crossdiff.load_crosscoder(path)"
    raise CrossdiffError(
        f"{function}: {name} must be a crosscoder (what train_crosscoder or load_crosscoder "
        f"returns), got {given(cc)}{hint}"
    )


def check_positive(value: Any, name: str, function: str, *, allow_none: bool = False) -> None:
    """`value` is a finite real number > 0 (None too, when `allow_none`)."""
    if value is None and allow_none:
        return
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if is_number and math.isfinite(float(value)) and float(value) > 0:
        return
    raise CrossdiffError(
        f"{function}: {name}={value!r} must be a finite number greater than 0 (e.g. {name}=2e-4)"
    )


def check_whole(value: Any, name: str, owner: str, minimum: int | None = 1) -> None:
    """`value` is a whole number (an int, not a float or a string) >= `minimum` (None: any)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if minimum is None or int(value) >= minimum:
            return
        raise CrossdiffError(f"{owner}: {name}={value} must be at least {minimum}")
    hint = ""
    if isinstance(value, str) and value.strip().isdigit():
        hint = f" (write {name}={value.strip()}, without quotes)"
    raise CrossdiffError(f"{owner}: {name} must be a whole number, got {given(value)}{hint}")
