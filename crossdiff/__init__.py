"""crossdiff: sparse crosscoders that diff a dense transformer and a Mixture-of-Experts transformer.

The public API is importable from the top level; see docs/api.md. `import crossdiff` is light: it
imports neither torch nor SAELens. It registers the crosscoder with SAELens at once if sae_lens is
already imported, and otherwise right after sae_lens is imported
(crossdiff/integrations/sae_lens_hook.py), so
`sae_lens.SAE.load_from_disk(dir)` loads a saved crosscoder in either order.
"""

from __future__ import annotations

__version__ = "0.1.0"

from crossdiff.integrations import sae_lens_hook as _sae_lens_hook  # noqa: E402
from crossdiff.plumbing.lazy import lazy_exports as _lazy_exports  # noqa: E402

_sae_lens_hook.install()

# name -> module that defines it. Loaded on first use so `import crossdiff` stays light.
_PUBLIC: dict[str, str] = {
    # models
    "dense_config": "crossdiff.models",
    "moe_config": "crossdiff.models",
    "matched_configs": "crossdiff.models",
    "count_parameters": "crossdiff.models",
    "build_model": "crossdiff.models",
    "load_model": "crossdiff.models",
    "save_model": "crossdiff.models",
    "train_language_models": "crossdiff.models",
    "CrossdiffMoE": "crossdiff.models",
    "swap_in_crossdiff_moe": "crossdiff.models",
    # data
    "embedded_corpus": "crossdiff.data",
    "hf_corpus": "crossdiff.data",
    "train_tokenizer": "crossdiff.data",
    "load_tokenizer": "crossdiff.data",
    "TokenSet": "crossdiff.data",
    "build_token_set": "crossdiff.data",
    "prepare_data": "crossdiff.data",
    "PreparedData": "crossdiff.data",
    "Document": "crossdiff.data",
    "DomainSource": "crossdiff.data",
    "CrossdiffTokenizer": "crossdiff.data",
    # activations
    "load_pairing": "crossdiff.activations",
    "harvest": "crossdiff.activations",
    "ActivationStore": "crossdiff.activations",
    # crosscoder
    "CrossCoderConfig": "crossdiff.crosscoder",
    "CrossCoder": "crossdiff.crosscoder",
    "train_crosscoder": "crossdiff.crosscoder",
    "load_crosscoder": "crossdiff.crosscoder",
    "push_to_hub": "crossdiff.crosscoder",
    "evaluate_crosscoder": "crossdiff.crosscoder",
    # analysis and report
    "diff_features": "crossdiff.analysis",
    "FeatureDiff": "crossdiff.analysis",
    "top_contexts": "crossdiff.analysis",
    "write_report": "crossdiff.report",
    # utilities
    "CrossdiffError": "crossdiff.plumbing.common",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


__getattr__, __dir__ = _lazy_exports(__name__, _PUBLIC, globals())
