"""The import rule (docs/architecture.md): a stage's modules never import a later stage's, in the
order data < models < activations < crosscoder < analysis < report. Function-level imports count
too. Below the stages: plumbing/ and integrations/; above them: run/ (the floors test below)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crossdiff"
STAGES = ["data", "models", "activations", "crosscoder", "analysis", "report"]
# a stage's `commands.py` is its CLI subcommand: it may call the stages it runs after (none does
# today), so it follows the rule like any other module


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _imports_up(order: list[str]) -> list[str]:
    """Each import, in a module of a package of `order`, of a package later in `order`."""
    broken = []
    for rank, package in enumerate(order):
        later = order[rank + 1 :]
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for name in _imported(path):
                parts = name.split(".")
                if len(parts) >= 2 and parts[0] == "crossdiff" and parts[1] in later:
                    broken.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return broken


def test_no_stage_imports_a_later_stage():
    broken = _imports_up(STAGES)
    assert not broken, "a stage imports a later stage:\n" + "\n".join(broken)


# the floors of the whole package, lowest first (docs/architecture.md, "The packages"): a module
# never imports a package on a higher floor; the top level holds only the face and packages
FLOORS = ["plumbing", "integrations", *STAGES, "run"]
FACE = {"__init__.py", "__main__.py", "cli.py", "py.typed"}


def test_no_package_imports_a_higher_floor():
    broken = _imports_up(FLOORS)
    assert not broken, "an import runs up a floor:\n" + "\n".join(broken)


def test_the_top_level_holds_only_the_face_and_the_packages():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(FLOORS), sorted(packages ^ set(FLOORS))
    assert entries - packages == FACE, sorted((entries - packages) ^ FACE)
