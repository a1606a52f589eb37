"""``explain``: the one call most users need."""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from typing import Any, Callable, Literal

import torch

from ._classifier import device_of, frozen
from ._validation import ClassIds, check_class_ids, check_classifier, check_images, probe_classifier
from .explainer import Explainer
from .hub import cached_explainer, pretrained_for
from .optimize import optimize_masks

__all__ = ["explain"]

logger = logging.getLogger(__name__)
_warned_fallback = False
_unavailable: set[str] = set()
# (classifier -> explainers already checked against it), so the check costs one forward pass once.
_checked: "weakref.WeakKeyDictionary[Any, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def _check_pair(classifier: Callable[[torch.Tensor], torch.Tensor], explainer: Explainer, images: torch.Tensor) -> None:
    """An explainer is valid for its own classifier only: the class count and, where its
    config records one, the input size must match."""
    size = (explainer.config.get("classifier") or {}).get("input_size")
    if size and list(images.shape[1:]) != list(size):
        raise ValueError(
            f"images: the explainer was trained on inputs of shape {tuple(size)}, got {tuple(images.shape[1:])}; "
            "preprocess images as for its classifier"
        )
    try:
        if explainer in _checked.get(classifier, ()):
            return
    except TypeError:  # not weak-referenceable: check every time
        pass
    k = probe_classifier(classifier, images[:1].to(device_of(classifier, images.device)))
    if k != explainer.num_classes:
        raise ValueError(f"explainer: it explains a classifier of {explainer.num_classes} classes, this one returns {k} logits")
    try:
        _checked.setdefault(classifier, weakref.WeakSet()).add(explainer)
    except TypeError:
        pass


def explain(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    class_ids: ClassIds,
    explainer: Explainer | str | os.PathLike | None = None,
    method: Literal["auto", "explainer", "optimize"] = "auto",
    batch_size: int = 64,
    **optimize_kwargs: Any,
) -> torch.Tensor:
    """Saliency masks of ``classifier`` for ``images`` and ``class_ids``.

    Args:
        classifier: any differentiable model or callable mapping ``(N, 3, H, W)`` to logits
            ``(N, K)``; treated as a black box, left in the mode it was in and never changed.
        images: the batch exactly as the classifier takes it (already normalised).
        class_ids: an int (the same class for all), a list, or a ``(N,)`` tensor.
        explainer: a trained :class:`Explainer` for this classifier, or the folder or Hub repo
            id of one (loaded once per process). Left out, a timm classifier with a known
            pretrained explainer (:data:`blackbox_saliency.hub.KNOWN_EXPLAINERS`) gets it.
        method: ``"explainer"`` (one forward pass; needs ``explainer``), ``"optimize"`` (the
            paper's slow iterative baseline: a few hundred classifier passes per image), or
            ``"auto"``: the explainer when there is one, else the optimisation, with a warning.
        batch_size: images processed at once.
        **optimize_kwargs: ``steps``, ``lr``, ``mask_size``, ``objective`` for the optimisation.

    Returns:
        Masks ``(N, 1, H, W)`` in ``[0, 1]`` on the images' device; 1 keeps evidence, 0 removes it.

    Example:
        >>> clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
        >>> explain(clf, torch.randn(2, 3, 16, 16), 1, method="optimize", steps=2).shape
        torch.Size([2, 1, 16, 16])
    """
    global _warned_fallback
    classifier = check_classifier(classifier)
    images = check_images(images)
    if method not in ("auto", "explainer", "optimize"):
        raise ValueError(f"method: expected 'auto', 'explainer' or 'optimize', got {method!r}")
    if isinstance(explainer, (str, os.PathLike)):
        explainer = cached_explainer(os.fspath(explainer))
    elif explainer is not None and not isinstance(explainer, Explainer):
        raise TypeError(f"explainer: expected an Explainer, a folder or a Hub repo id, got {type(explainer).__name__}")
    if explainer is None and method in ("auto", "explainer"):
        explainer = _known_explainer(classifier, images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if method == "explainer" and explainer is None:
        raise ValueError("explainer: method='explainer' needs a trained explainer (see fit_explainer)")
    if optimize_kwargs and (method == "explainer" or (method == "auto" and explainer is not None)):
        raise TypeError(f"explain: {sorted(optimize_kwargs)} only apply to method='optimize'")

    if method == "explainer" or (method == "auto" and explainer is not None):
        check_images(images, channels=explainer.config["in_chans"], min_size=explainer.config["mask_reduction"],
                     finite=False)  # values were checked above; each chunk is checked again in forward
        ids = check_class_ids(class_ids, images.shape[0], explainer.num_classes)
        _check_pair(classifier, explainer, images)
        out = torch.empty(images.shape[0], 1, *images.shape[-2:], device=images.device)
        with torch.no_grad():  # chunks fill a preallocated output: memory stays masks + one chunk
            for i in range(0, images.shape[0], batch_size):
                out[i : i + batch_size] = explainer(images[i : i + batch_size], ids[i : i + batch_size])
        return out

    if method == "auto" and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "explain: no trained explainer given, so masks are found by iterative optimisation "
            "(hundreds of classifier passes per image); train one with fit_explainer for one-pass masks",
            stacklevel=2,
        )
    device = device_of(classifier, images.device)
    with frozen(classifier):
        k = probe_classifier(classifier, images[:1].to(device), need_gradient=True)
    ids = check_class_ids(class_ids, images.shape[0], k)
    out = torch.empty(images.shape[0], 1, *images.shape[-2:], device=images.device)
    for i in range(0, images.shape[0], batch_size):
        logger.debug("optimising masks for images %d-%d", i, min(i + batch_size, images.shape[0]))
        chunk = images[i : i + batch_size].to(device)
        out[i : i + batch_size] = optimize_masks(classifier, chunk, ids[i : i + batch_size], **optimize_kwargs)
    return out


def _known_explainer(classifier: object, images: torch.Tensor) -> Explainer | None:
    """This project's pretrained explainer for the classifier's architecture, when it has one,
    it can be loaded (from a checkout's hub/ folder, or the Hub and its cache), and it fits:
    same class count and input size. A fine-tuned model of a known architecture falls through
    to the caller's fallback instead of meeting an explainer it never asked for."""
    name = pretrained_for(classifier)
    if name is None or name in _unavailable:
        return None
    try:
        explainer = cached_explainer(name)
    except (FileNotFoundError, ValueError) as err:
        _unavailable.add(name)  # offline or missing: do not ask again in this process
        logger.info("no pretrained explainer available for this classifier (%s)", err)
        return None
    size = (explainer.config.get("classifier") or {}).get("input_size")
    classes = getattr(classifier, "num_classes", None)
    if (classes is not None and classes != explainer.num_classes) or (size and list(images.shape[1:]) != list(size)):
        logger.info("the pretrained explainer %s does not fit this classifier or input size; not using it", name)
        return None
    logger.info("using the pretrained explainer %s", name)
    return explainer
