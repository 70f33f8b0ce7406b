"""`crossdiff run`: the stage graph over the five stages (data, models, store, crosscoder,
report), its records (reused, resumed or redone), the checks and estimate made before anything
runs, the extra seeds and model seeds, and the summary printed at the end. The top floor: it
imports the stage packages and the plumbing; nothing but the CLI imports it."""

from crossdiff.plumbing.lazy import lazy_exports

_LAZY = {"run_pipeline": "crossdiff.run.pipeline"}

__all__ = ["run_pipeline"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
