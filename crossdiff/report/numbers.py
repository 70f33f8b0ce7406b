"""How the report writes a number (shared by report.md, report.html and their sections)."""

from __future__ import annotations

from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers as the report shows them: ints exact, floats to `digits` significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
