"""``explain``: the one call most users need, and ``top_classes`` for the classes to explain."""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Literal, Sequence, Union

import torch
from PIL import Image

from ._blackbox import device_of, frozen
from ._validation import (ClassIds, LogitsOf, check_class_ids, check_classifier, check_images, check_logits,
                          probe_classifier)
from .explainer import Explainer
from .hub import known_explainer_for, shared_explainer
from .optimize import optimize_masks

__all__ = ["explain", "top_classes"]

#: What ``images`` may be: a normalised ``(N, C, H, W)`` tensor, or (with a timm classifier)
#: PIL images or image file paths, one or a list.
Images = Union[torch.Tensor, Image.Image, str, os.PathLike, Sequence[Union[Image.Image, str, os.PathLike]]]

logger = logging.getLogger(__name__)
_warned_fallback = False
# (classifier -> explainers already checked against it), so the check costs one forward pass once.
_checked: "weakref.WeakKeyDictionary[Any, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def _check_pair(classifier: Callable[[torch.Tensor], Any], logits_of: LogitsOf, explainer: Explainer,
                images: torch.Tensor) -> None:
    """An explainer is valid for its own classifier only: the class count and, where its
    config records one, the input size must match. The check is remembered per classifier
    (``classifier``, the user's object) unless an ``output=`` adapter is in play."""
    size = explainer.config.classifier.input_size
    if size and list(images.shape[1:]) != list(size):
        raise ValueError(
            f"images: the explainer was trained on inputs of shape {tuple(size)}, got {tuple(images.shape[1:])}; "
            "preprocess images as for its classifier"
        )
    cache = logits_of.output is None  # an adapter may change from call to call
    try:
        if cache and explainer in _checked.get(classifier, ()):
            return
    except TypeError:  # not weak-referenceable: check every time
        pass
    with frozen(classifier):  # eval mode: a model left in training mode must not update its batch statistics
        k = probe_classifier(logits_of, images[:1].to(device_of(classifier, images.device)))
    if k != explainer.num_classes:
        raise ValueError(f"explainer: it explains a classifier of {explainer.num_classes} classes, this one returns {k} logits")
    try:
        if cache:
            _checked.setdefault(classifier, weakref.WeakSet()).add(explainer)
    except TypeError:
        pass


def _is_picture(item: object) -> bool:
    return isinstance(item, (Image.Image, str, os.PathLike))


def _as_batch(classifier: object, images: object) -> torch.Tensor:
    """``images`` as the checked tensor batch the classifier takes: a tensor as it is, PIL
    images and file paths preprocessed as the timm classifier's ``pretrained_cfg`` says."""
    if isinstance(images, torch.Tensor):
        return check_images(images)
    items = [images] if _is_picture(images) else images
    if isinstance(items, (list, tuple)) and not items:
        raise ValueError("images: the batch is empty")
    if isinstance(items, (list, tuple)) and all(_is_picture(item) for item in items):
        return check_images(_preprocess(classifier, items))
    return check_images(images)  # the usual error for anything else


def _preprocess(classifier: object, pictures: Sequence[Image.Image | str | os.PathLike]) -> torch.Tensor:
    """PIL images or image files through the classifier's own eval transform (timm's
    ``resolve_data_config`` and ``create_transform``: resize by ``crop_pct``, centre crop to
    ``input_size``, normalise with ``mean`` and ``std``), stacked on the classifier's device."""
    cfg = getattr(classifier, "pretrained_cfg", None) or getattr(classifier, "default_cfg", None)
    if not isinstance(cfg, Mapping) or not all(key in cfg for key in ("input_size", "mean", "std")):
        raise TypeError(
            "images: PIL images and file paths need a timm classifier, whose pretrained_cfg says how to preprocess "
            f"them; this {type(classifier).__name__} has none. Pass a normalised (N, C, H, W) tensor instead, "
            "e.g. torch.stack([preprocess(picture) for picture in pictures])"
        )
    from timm.data import create_transform, resolve_data_config  # timm is slow to import: only when needed

    config = resolve_data_config({}, pretrained_cfg=dict(cfg))
    transform = create_transform(**config)
    mode = "L" if config["input_size"][0] == 1 else "RGB"
    batch = torch.stack([transform(_open(picture, mode)) for picture in pictures])
    return batch.to(device_of(classifier))


def _open(picture: Image.Image | str | os.PathLike, mode: str) -> Image.Image:
    if isinstance(picture, Image.Image):
        return picture.convert(mode)
    path = os.fspath(picture)
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"images: no such file: {path!r}") from None
    except OSError as err:  # not an image, or a truncated one
        raise ValueError(f"images: cannot read {path!r} as an image ({err})") from err


def _check_k(k: object, num_classes: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        raise ValueError(f"k: expected an int from 1 to the classifier's {num_classes} classes, got {k!r}")
    return k


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return batch_size


def _top_ids(classifier: object, logits_of: LogitsOf, images: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """The ``k`` highest-scoring classes of each image, ``(N, k)`` int64 on the CPU, best first:
    one forward pass in eval mode and ``no_grad``, chunk by chunk."""
    device = device_of(classifier, images.device)
    chunks = []
    with frozen(classifier), torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            chunk = images[i : i + batch_size].to(device)
            logits = check_logits(logits_of(chunk), chunk.shape[0])
            chunks.append(logits.topk(k, dim=1).indices.cpu())
    return torch.cat(chunks)


def top_classes(
    classifier: Callable[[torch.Tensor], Any],
    images: Images,
    k: int = 1,
    *,
    output: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """The ``k`` classes the classifier scores highest for each image, best first.

    Args:
        classifier, images, output, batch_size: as for :func:`explain`.
        k: how many classes per image.

    Returns:
        Class ids ``(N, k)``, int64 on the CPU; ``[:, j]`` is a valid ``class_ids`` for :func:`explain`.

    Example:
        >>> clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
        >>> top_classes(clf, torch.randn(2, 3, 16, 16), k=3).shape
        torch.Size([2, 3])
    """
    model = check_classifier(classifier)
    logits_of = LogitsOf(model, output)
    images = _as_batch(model, images)
    batch_size = _check_batch_size(batch_size)
    with frozen(model):
        num_classes = probe_classifier(logits_of, images[:1].to(device_of(model, images.device)))
    return _top_ids(model, logits_of, images, _check_k(k, num_classes), batch_size)


def _warn_untrained_classes(explainer: Explainer, ids: torch.Tensor) -> None:
    """An explainer trained on some of the classifier's classes only (its config's
    ``training["classes_explained"]``) never trained the masks (nor, unless its embedding comes
    from the classifier's head, the class embedding) of the others: say so rather than return
    masks that look like any other."""
    trained = (explainer.config.training or {}).get("classes_explained")
    if not trained:
        return
    missing = sorted(set(ids.tolist()) - set(trained))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        warnings.warn(
            f"class_ids: the explainer was trained on {len(trained)} of its {explainer.num_classes} classes; "
            f"{len(missing)} asked for here ({shown}) are not among them and their masks are not reliable "
            "(docs/evaluation.md); method='optimize' explains any class",
            stacklevel=3,
        )


def explain(
    classifier: Callable[[torch.Tensor], Any],
    images: Images,
    class_ids: ClassIds | None = None,
    explainer: Explainer | str | os.PathLike | None = None,
    method: Literal["auto", "explainer", "optimize"] = "auto",
    batch_size: int = 64,
    *,
    output: Callable[[Any], torch.Tensor] | None = None,
    **optimize_kwargs: Any,
) -> torch.Tensor:
    """Saliency masks of ``classifier`` for ``images`` and ``class_ids``.

    Args:
        classifier: any differentiable model or callable mapping ``(N, 3, H, W)`` to logits
            ``(N, K)``; treated as a black box, left in the mode it was in and never changed.
            An output that is not a tensor is unwrapped when it is an object with a tensor
            ``.logits`` (Hugging Face models), a dict with key ``"logits"``, or a tuple or list
            whose first element is the logits; otherwise pass ``output``.
        images: the batch exactly as the classifier takes it (already normalised); or, with a
            timm classifier, PIL images or image file paths (one or a list), preprocessed with
            the classifier's ``pretrained_cfg``: the masks are then at its input size, on its device.
        class_ids: an int (the same class for all), a list, or a ``(N,)`` tensor; ``None``
            (default): each image's top prediction (see :func:`top_classes` for the top k).
        explainer: a trained :class:`Explainer` for this classifier, or the folder or Hub repo
            id of one (loaded once per process). Left out, a timm classifier with a known
            pretrained explainer (:data:`blackbox_saliency.hub.KNOWN_EXPLAINERS`) gets it.
        method: ``"explainer"`` (one forward pass; needs ``explainer``), ``"optimize"`` (the
            paper's slow iterative baseline: a few hundred classifier passes per image), or
            ``"auto"``: the explainer when there is one, else the optimisation, with a warning.
        batch_size: images processed at once.
        output: a callable taking the classifier's raw output and returning the logits
            ``(N, K)``, e.g. ``output=lambda out: out["scores"]``.
        **optimize_kwargs: ``steps``, ``lr``, ``mask_size``, ``objective`` for the optimisation.

    Returns:
        Masks ``(N, 1, H, W)`` in ``[0, 1]`` on the images' device; 1 keeps evidence, 0 removes it.

    Example:
        >>> clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
        >>> explain(clf, torch.randn(2, 3, 16, 16), 1, method="optimize", steps=2).shape
        torch.Size([2, 1, 16, 16])
    """
    global _warned_fallback
    model = check_classifier(classifier)
    logits_of = LogitsOf(model, output)  # every call to the classifier goes through this
    images = _as_batch(model, images)
    if method not in ("auto", "explainer", "optimize"):
        raise ValueError(f"method: expected 'auto', 'explainer' or 'optimize', got {method!r}")
    if isinstance(explainer, (str, os.PathLike)):  # loaded once per process and device, never changed here
        explainer = shared_explainer(explainer, device=device_of(model, images.device))
    elif explainer is not None and not isinstance(explainer, Explainer):
        raise TypeError(f"explainer: expected an Explainer, a folder or a Hub repo id, got {type(explainer).__name__}")
    if explainer is None and method in ("auto", "explainer"):
        explainer = known_explainer_for(model, tuple(images.shape[1:]), device_of(model, images.device))
    batch_size = _check_batch_size(batch_size)
    if method == "explainer" and explainer is None:
        raise ValueError("explainer: method='explainer' needs a trained explainer (see fit_explainer)")
    if optimize_kwargs and (method == "explainer" or (method == "auto" and explainer is not None)):
        raise TypeError(f"explain: {sorted(optimize_kwargs)} only apply to method='optimize'")

    if method == "explainer" or (method == "auto" and explainer is not None):
        check_images(images, channels=explainer.config.in_chans, min_size=explainer.config.mask_reduction,
                     finite=False)  # values were checked above
        if class_ids is not None:
            ids = check_class_ids(class_ids, images.shape[0], explainer.num_classes)
        _check_pair(model, logits_of, explainer, images)
        if class_ids is None:
            ids = _top_ids(model, logits_of, images, 1, batch_size)[:, 0]
        _warn_untrained_classes(explainer, ids)
        out = torch.empty(images.shape[0], 1, *images.shape[-2:], device=images.device)
        with torch.no_grad():  # chunks fill a preallocated output: memory stays masks + one chunk
            for i in range(0, images.shape[0], batch_size):
                out[i : i + batch_size] = explainer._masks(images[i : i + batch_size], ids[i : i + batch_size])
        return out

    if method == "auto" and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "explain: no trained explainer given, so masks are found by iterative optimisation "
            "(hundreds of classifier passes per image); train one with fit_explainer for one-pass masks",
            stacklevel=2,
        )
    device = device_of(model, images.device)
    with frozen(model):
        k = probe_classifier(logits_of, images[:1].to(device), need_gradient=True)
    if class_ids is None:
        ids = _top_ids(model, logits_of, images, 1, batch_size)[:, 0]
    else:
        ids = check_class_ids(class_ids, images.shape[0], k)
    out = torch.empty(images.shape[0], 1, *images.shape[-2:], device=images.device)
    with frozen(model):  # logits_of is not the module itself, so optimize_masks cannot freeze it
        for i in range(0, images.shape[0], batch_size):
            logger.debug("optimising masks for images %d-%d", i, min(i + batch_size, images.shape[0]))
            chunk = images[i : i + batch_size].to(device)
            out[i : i + batch_size] = optimize_masks(logits_of, chunk, ids[i : i + batch_size], **optimize_kwargs)
    return out
