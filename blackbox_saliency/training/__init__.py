"""Training an explainer against a fixed classifier (the paper's section 4.1), one module per
concept: :mod:`.fit` (the entry: resolve the recipe, build, run), :mod:`.stages` (the embedding
and mask stages), :mod:`.losses`, :mod:`.data` (checks, loaders, sampling) and :mod:`.runtime`
(device, precision, memory, checkpoints)."""

from .fit import CHECKPOINT_NAME, build_explainer, fit_explainer

__all__ = ["fit_explainer", "build_explainer", "CHECKPOINT_NAME"]
