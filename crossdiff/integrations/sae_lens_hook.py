"""Register the crosscoder with SAELens as soon as both are imported, without importing SAELens.

`import crossdiff` must stay light (SAELens pulls in torch, transformers, datasets, pandas, ...),
yet `import crossdiff; from sae_lens import SAE; SAE.load_from_disk(dir)` must find the
crosscoder. So `import crossdiff` registers at once if sae_lens is already imported, and otherwise
puts a one-shot finder on `sys.meta_path` that wraps sae_lens's loader: right after the sae_lens
package has finished executing, it imports crossdiff.crosscoder (which registers) and removes
itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

_TARGET = "sae_lens"
_REGISTERING_MODULE = "crossdiff.crosscoder"


def _register() -> None:
    # crossdiff.crosscoder in sys.modules: it is being (or was) imported, and it registers itself
    # at its end; importing it again from inside its own import would see half a module
    if _REGISTERING_MODULE not in sys.modules:
        importlib.import_module(_REGISTERING_MODULE)


def _register_after_sae_lens() -> None:
    # an error here would make `import sae_lens` itself fail; the same error is raised again,
    # with its advice, when crossdiff.crosscoder is next imported
    try:
        _register()
    except Exception as err:
        warnings.warn(
            f"crossdiff could not register its crosscoder with SAELens: {err}", stacklevel=2
        )


class _RegisterAfterExec(importlib.abc.Loader):
    """sae_lens's own loader, followed by the registration."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register_after_sae_lens()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, get_source, ...
        return getattr(self._loader, name)


class SaeLensImportHook(importlib.abc.MetaPathFinder):
    """A one-shot finder: it answers only for the top-level `sae_lens` package."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        uninstall()  # one shot; also keeps the lookup below from finding this finder again
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is not None and (spec := find(fullname, path, target)) is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, SaeLensImportHook)]


def install() -> None:
    """Register now if sae_lens is imported, else once it is (called by `import crossdiff`)."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, SaeLensImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, SaeLensImportHook())
