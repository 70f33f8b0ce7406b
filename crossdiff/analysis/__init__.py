"""Feature diff: classes by relative decoder norm, density per class, domain shares, routed experts,
latent scaling and top contexts of a trained crosscoder."""

from crossdiff.analysis.classes import SPLITS, class_names, resolve_split
from crossdiff.analysis.contexts import top_contexts
from crossdiff.analysis.diff import FeatureDiff, diff_features

__all__ = ["SPLITS", "FeatureDiff", "class_names", "diff_features", "resolve_split", "top_contexts"]
