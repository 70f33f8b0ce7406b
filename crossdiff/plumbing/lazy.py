"""Names a package exports lazily: each is imported from its module on first use (PEP 562), so
importing the package stays light. Imports nothing heavy itself."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, modules: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's `__getattr__` and `__dir__`: `modules` maps a name to the module defining
    it; a name once loaded is kept in `namespace` (the package's globals); `__dir__` lists the
    package's `__all__`."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            value = getattr(importlib.import_module(modules[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return namespace["__all__"]

    return __getattr__, __dir__
