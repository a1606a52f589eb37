"""blackbox-saliency: real-time saliency masks for any differentiable image classifier.

The method of Dabkowski & Gal, "Real Time Image Saliency for Black Box Classifiers" (2017): a
masking model trained against a fixed classifier outputs, in one forward pass, the smallest
smooth mask that keeps the class recognisable and whose removal destroys it.

Example:
    >>> from blackbox_saliency import explain, fit_explainer   # doctest: +SKIP
    >>> explainer = fit_explainer(classifier, dataset)   # doctest: +SKIP
    >>> masks = explain(classifier, images, class_ids, explainer=explainer)   # doctest: +SKIP
"""

from .api import explain, top_classes
from .classifiers import load_classifier
from .explainer import ClassifierInfo, Explainer, ExplainerConfig
from .objective import SaliencyObjective
from .recipes import Recipe, get_recipe, list_recipes
from .training import fit_explainer

__all__ = ["explain", "top_classes", "fit_explainer", "Recipe", "get_recipe", "list_recipes", "Explainer",
           "ExplainerConfig", "ClassifierInfo", "SaliencyObjective", "load_classifier"]
__version__ = "0.1.0"
