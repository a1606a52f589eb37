"""This project's own trained models: which classifier each explainer belongs to, where its
files are (shipped inside the package, else on the Hugging Face Hub), and the per-process cache
``explain`` loads them through.

The shipped files live in ``blackbox_saliency/weights/<name>/`` (``config.json``,
``model.safetensors``, ``README.md``), installed with the package, so the pretrained explainer
of the default classifier works offline after ``pip install``. Nothing here reads a source
checkout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .explainer import Explainer
from .hub import CONFIG_NAME, WEIGHTS_NAME, snapshot_folder

__all__ = ["KNOWN_EXPLAINERS", "WEIGHTS_FOLDER", "pretrained_for", "load_explainer", "shared_explainer",
           "known_explainer_for", "weights_folder"]

logger = logging.getLogger(__name__)

#: Where the package's shipped models are.
WEIGHTS_FOLDER = Path(__file__).resolve().parent / "weights"

#: Classifier architecture (``pretrained_cfg["architecture"]``) -> its explainer: the folder
#: shipped in :data:`WEIGHTS_FOLDER` and the Hub repo it is published as.
KNOWN_EXPLAINERS: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {"repo_id": "blackbox-saliency/explainer-efficientnet_lite0", "folder": "explainer-efficientnet_lite0"},
    "cifar10_resnet9": {"repo_id": "blackbox-saliency/explainer-cifar10", "folder": "explainer-cifar10"},
}

#: After a failed load (offline, a timeout, a gated repo), try again after this many seconds:
#: not on every call (a Hub retry costs most of a minute), not never (the network comes back).
RETRY_AFTER_SECONDS = 300.0

_lock = threading.Lock()
_cache: dict[tuple[str, str | None, str], Explainer] = {}
_failed: dict[str, float] = {}


def weights_folder(folder: str, repo_id: str) -> Path:
    """The local folder of a model this project publishes: the copy shipped in the package when
    it is there, else the Hub snapshot of ``repo_id`` (downloaded, or the cache offline)."""
    shipped = WEIGHTS_FOLDER / folder
    if (shipped / WEIGHTS_NAME).is_file() and (shipped / CONFIG_NAME).is_file():
        return shipped
    return snapshot_folder(repo_id, what=f"{folder} (not shipped in this installation)")


def pretrained_for(classifier: object) -> str | None:
    """This project's explainer for a classifier, by its ``pretrained_cfg["architecture"]``: the
    shipped folder, else its Hub repo id; ``None`` when the architecture has no known explainer."""
    cfg = getattr(classifier, "pretrained_cfg", None) or getattr(classifier, "default_cfg", None) or {}
    entry = KNOWN_EXPLAINERS.get(cfg.get("architecture", "") if isinstance(cfg, dict) else "")
    if entry is None:
        return None
    folder = WEIGHTS_FOLDER / entry["folder"]
    return str(folder) if (folder / WEIGHTS_NAME).is_file() else entry["repo_id"]


def load_explainer(name_or_folder: str | os.PathLike, revision: str | None = None, **kwargs: Any) -> Explainer:
    """:meth:`Explainer.from_pretrained`, as a function: a new module of the caller's own."""
    return Explainer.from_pretrained(name_or_folder, revision=revision, **kwargs)


def shared_explainer(name_or_folder: str | os.PathLike, revision: str | None = None,
                     device: str | torch.device = "cpu") -> Explainer:
    """One explainer per (name, revision, device), loaded once per process and shared by every
    caller: treat it as read-only (``explain`` does). For a module to change (``.to()``,
    ``for_inference``), use :func:`load_explainer`, which gives a copy of your own."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: not a device: {device!r}") from err
    key = (os.fspath(name_or_folder), revision, str(device))
    with _lock:
        if key not in _cache:
            _cache[key] = load_explainer(key[0], revision=revision, map_location=device)
        return _cache[key]


def clear_cache() -> None:
    """Forget loaded explainers and failed loads (tests; a long-running process that changed its
    network or credentials)."""
    with _lock:
        _cache.clear()
        _failed.clear()


def known_explainer_for(classifier: object, input_shape: tuple[int, ...], device: str | torch.device) -> Explainer | None:
    """This project's pretrained explainer for ``classifier``, on ``device``, when the
    architecture has one, it can be loaded, and it fits: the same class count and input shape
    ``(C, H, W)``. A fine-tuned model of a known architecture gets ``None`` instead of an
    explainer it never asked for; so does one whose explainer failed to load in the last
    :data:`RETRY_AFTER_SECONDS`."""
    name = pretrained_for(classifier)
    if name is None:
        return None
    failed_at = _failed.get(name)
    if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_SECONDS:
        return None
    try:
        explainer = shared_explainer(name, device=device)
    except Exception as err:  # offline, a timeout, a gated or missing repo, a malformed folder
        _failed[name] = time.monotonic()
        logger.warning("the pretrained explainer %s is not available (%s); trying again after %.0f s", name, err,
                    RETRY_AFTER_SECONDS)
        return None
    _failed.pop(name, None)
    size = explainer.config.classifier.input_size
    classes = getattr(classifier, "num_classes", None)
    if (classes is not None and classes != explainer.num_classes) or (size and list(input_shape) != list(size)):
        logger.info("the pretrained explainer %s does not fit this classifier or input size; not using it", name)
        return None
    logger.info("using the pretrained explainer %s", name)
    return explainer
