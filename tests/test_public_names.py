"""Every name docs/api.md documents imports from where it says: each `### crossdiff.NAME` from the
top level and from its section's package, and each dotted path in backticks (with the calls named
beside a module path in the same paragraph or list item) from that module."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import crossdiff

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
DOTTED = re.compile(r"`(crossdiff(?:\.[A-Za-z_]\w*)+)")
CALL = re.compile(r"`([a-z_]\w*)\(")


def _resolve(path: str) -> tuple[ModuleType, Any]:
    """(the longest importable module of `path`, the object `path` names)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        value: Any = module
        for name in parts[cut:]:
            value = getattr(value, name)
        return module, value
    raise ModuleNotFoundError(path)


def _headings() -> list[tuple[str, list[str]]]:
    """(NAME of each `### crossdiff.NAME`, the packages its `## Section (pkg, ...)` names)."""
    out, packages = [], []
    for line in API.read_text().splitlines():
        if line.startswith("## "):
            packages = re.findall(r"`(crossdiff\.\w+)`", line)
        elif m := re.match(r"### `crossdiff\.(\w+)`", line):
            out.append((m.group(1), packages))
    return out


def _paragraphs() -> list[str]:
    text = re.sub(r"```.*?```", "", API.read_text(), flags=re.S)  # signatures are not names
    return [p for p in re.split(r"\n\s*\n|\n(?=- )", text) if p.strip()]


def test_the_api_page_documents_the_top_level_names():
    headed = {name for name, _ in _headings()}
    assert len(headed) > 30
    assert headed <= set(crossdiff.__all__), sorted(headed - set(crossdiff.__all__))


@pytest.mark.parametrize("name,packages", _headings(), ids=[n for n, _ in _headings()])
def test_each_headed_name_imports_from_the_top_level_and_its_package(name, packages):
    value = getattr(crossdiff, name)
    if packages:  # "importable ... from its stage module": one of the section's packages
        homes = [p for p in packages if getattr(importlib.import_module(p), name, None) is value]
        assert homes, f"crossdiff.{name} is in none of {packages}"


def test_each_dotted_path_and_the_calls_beside_it_import():
    checked = []
    for paragraph in _paragraphs():
        paths = DOTTED.findall(paragraph)
        for path in paths:
            if path.split(".")[-1].isupper():
                continue  # a placeholder: crossdiff.NAME
            _resolve(path)
            checked.append(path)
        if paths:
            module, first = _resolve(paths[0])
            if module is not crossdiff:  # calls in a top-level entry are the entry's methods
                for call in CALL.findall(paragraph):
                    assert hasattr(module, call), f"{module.__name__}.{call} (docs/api.md)"
                    checked.append(f"{module.__name__}.{call}")
    for expected in (
        "crossdiff.run.run_pipeline",
        "crossdiff.plumbing.distributed.rank_device",
        "crossdiff.activations.joint.joint_source",
        "crossdiff.analysis.architectures.compare_architectures",
    ):
        assert expected in checked
