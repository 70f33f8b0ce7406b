"""`HookedSAETransformer.add_sae(crosscoder)` refused at once, with what to use instead.

SAELens's HookedSAETransformer splices an SAE into one hook of one model: it runs `sae(x)` on that
hook's [batch, pos, d_model] and puts the output back. A crosscoder reads both models' activations
at once (its latents are computed from [n_models, d_model]), so spliced into one model it has no
input to encode from (before, `add_sae` accepted it and `run_with_saes` failed later with a shape
error). `register_with_sae_lens` wraps `add_sae` (once, keeping the original as `__wrapped__`) so
that a crossdiff crosscoder is refused there, naming
`crossdiff.crosscoder.spliced_loss.spliced_loss`,
which splices each model's part of the reconstruction into that model from both models' clean runs.
"""

from __future__ import annotations

import functools
from typing import Any

from crossdiff.plumbing.common import CrossdiffError

ADD_SAE_REFUSAL = (
    "HookedSAETransformer.add_sae cannot take a crossdiff crosscoder: it splices an SAE into one "
    "hook of one model, but a crosscoder encodes both models' activations at once "
    "([n_models, d_model] per token), which one model's forward pass does not have. To splice its "
    "reconstruction into each model use crossdiff.crosscoder.spliced_loss.spliced_loss(cc, "
    "(model_a, model_b), tokens, pairing) (crossdiff evaluate-crosscoder / `crossdiff report` "
    "report it); "
    "to read latents run both models and call cc.encode(torch.stack([x_a, x_b], dim=-2))"
)


def guard_add_sae() -> bool:
    """Wrap HookedSAETransformer.add_sae to refuse crosscoders; False when SAELens's
    HookedSAETransformer cannot be imported (it needs TransformerLens 3's HookedTransformer)."""
    try:
        from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer
    except ImportError:
        return False
    add_sae = HookedSAETransformer.add_sae
    if getattr(add_sae, "_crossdiff_guard", False):
        return True

    @functools.wraps(add_sae)
    def guarded(self: Any, sae: Any, *args: Any, **kwargs: Any) -> Any:
        from crossdiff.crosscoder.model import CrossCoderWeights

        if isinstance(sae, CrossCoderWeights):
            raise CrossdiffError(ADD_SAE_REFUSAL)
        return add_sae(self, sae, *args, **kwargs)

    guarded._crossdiff_guard = True  # type: ignore[attr-defined]
    HookedSAETransformer.add_sae = guarded  # type: ignore[method-assign]
    return True
