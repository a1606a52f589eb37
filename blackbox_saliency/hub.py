"""Hugging Face Hub I/O: where an explainer's files are (a folder, a Hub snapshot downloaded or
from the cache, or the copy shipped in the package), which classifier each of this project's
explainers belongs to, the per-process cache ``explain`` loads them through, and the model card.

:class:`~blackbox_saliency.Explainer` is a ``huggingface_hub.PyTorchModelHubMixin``: saving,
loading and pushing are the mixin's, made stricter there (safetensors only, strict weights,
config checked before anything is built, atomic writes). Files follow the Hub's conventions:
``config.json`` (plain JSON that rebuilds the model), ``model.safetensors`` and ``README.md``
(the model card). Pickle checkpoints are never loaded: they can run code.

The shipped files live in ``blackbox_saliency/weights/<name>/``, installed with the package, so
the pretrained explainer of the default classifier works offline after ``pip install``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from huggingface_hub import ModelCardData, constants, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

if TYPE_CHECKING:  # the explainer imports this module; this one imports it only inside functions
    from .explainer import Explainer, ExplainerConfig

__all__ = ["model_card", "resolve_folder", "snapshot_folder", "check_folder", "repo_id_problem", "KNOWN_EXPLAINERS",
           "WEIGHTS_FOLDER", "pretrained_for", "load_explainer", "shared_explainer", "known_explainer_for",
           "weights_folder", "clear_cache"]

logger = logging.getLogger(__name__)

CONFIG_NAME = constants.CONFIG_NAME  # "config.json"
WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"
CARD_NAME = constants.REPOCARD_NAME  # "README.md"
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The card metadata, given to the mixin when the explainer class is defined.
LIBRARY_NAME = "blackbox-saliency"
LICENSE = "mit"
PIPELINE_TAG = "image-segmentation"
TAGS = ("saliency", "explainability", "interpretability", "image-classification", "pytorch", "blackbox-saliency")
#: The library's code repository, linked from every model card; None until the project has a
#: public address (the card then leaves the line out).
REPO_URL: str | None = None
PAPER_URL = "https://arxiv.org/abs/1705.07857"

CITATION = """@inproceedings{dabkowski2017real,
  title={Real Time Image Saliency for Black Box Classifiers},
  author={Dabkowski, Piotr and Gal, Yarin},
  booktitle={Advances in Neural Information Processing Systems},
  year={2017}
}"""


def _evaluation_markdown(evaluation: object) -> str:
    """``config.evaluation`` as markdown: text as it is, or ``{"data": ..., "results": [rows]}``
    as a line on the data and a table with one row per dict of scores."""
    if not evaluation:
        return "No evaluation recorded for this explainer."
    if isinstance(evaluation, str):
        return evaluation
    if isinstance(evaluation, dict) and isinstance(evaluation.get("results"), list) and evaluation["results"]:
        rows = [r for r in evaluation["results"] if isinstance(r, dict)]
        names = list(dict.fromkeys(k for r in rows for k in r))
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines = [f"Data: {evaluation.get('data', 'not recorded')}", "", "| " + " | ".join(names) + " |",
                 "| " + " | ".join("---" for _ in names) + " |"]
        lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in names) + " |" for r in rows]
        return "\n".join(lines)
    return f"`{json.dumps(evaluation, sort_keys=True)}`"


def _not_recorded(value: object) -> object:
    return "not recorded" if value is None else value


def model_card(config: "ExplainerConfig", card_data: ModelCardData, repo_id: str | None = None,
               repo_url: str | None = None) -> str:
    """The model card (README.md) of an explainer: ``card_data`` as its YAML header, then what it
    explains, how it was trained, how well it does (``config.evaluation``), usage, citation."""
    classifier = config.classifier
    name = classifier.name or "an unnamed classifier"
    load = repo_id or "path/to/this/folder"
    links = [f"- paper: {PAPER_URL}"] + ([f"- code: {repo_url}"] if repo_url else [])
    lines = [
        "---", card_data.to_yaml(), "---", "",
        f"# Saliency explainer for `{name}`", "",
        "A masking model (Dabkowski & Gal, 2017) that outputs, in one forward pass, the smallest smooth mask "
        f"that keeps the class recognisable to `{name}` and whose removal destroys it.", "",
        f"**It explains `{name}` and nothing else**: masks say what that classifier needs, so an explainer is "
        "valid only for the classifier (and preprocessing) it was trained against.", "",
        "## The classifier", "",
        f"- name: `{name}`",
        f"- input size: {_not_recorded(classifier.input_size)}",
        f"- normalisation: mean {_not_recorded(classifier.mean)}, std {_not_recorded(classifier.std)}",
        f"- classes: {config.num_classes}", "",
        "## The explainer", "",
        f"- encoder: `{config.encoder}` {json.dumps(config.encoder_kwargs)}, "
        f"{'frozen' if config.freeze_encoder else 'trained'}"
        + ("; the class filter reads its own copy of it (`gate_encoder`)" if config.gate_encoder else ""),
        f"- mask at 1/{config.mask_reduction} of the input resolution, upsampled bilinearly",
        f"- class filter: `{config.class_filter}`, class embedding `{config.class_embedding}`, class scores "
        + (f"centred per image on {config.presence_reference:.4f} (`presence_reference`)"
           if config.presence_reference is not None
           else f"standardised per image, present {config.presence_std_threshold:g} deviations above the mean "
           "(`presence_std_threshold`)" if config.presence_std_threshold is not None else "not centred"),
        f"- objective: `{json.dumps(config.objective, sort_keys=True)}`",
        f"- training: `{json.dumps(config.training, sort_keys=True)}`" if config.training else "- training: not recorded",
        f"- training data: {_not_recorded(config.training_data)}", "",
        "## Evaluation", "",
        _evaluation_markdown(config.evaluation), "",
        "## Usage", "",
        "```python",
        "from blackbox_saliency import Explainer, explain",
        "",
        f'explainer = Explainer.from_pretrained("{load}")',
        "masks = explain(classifier, images, class_ids, explainer=explainer)  # (N, 1, H, W) in [0, 1]",
        "```", "",
        "## Limitations", "",
        "- Masks show what the classifier uses, which need not be what a person would point at.",
        f"- The mask has 1/{config.mask_reduction} of the input resolution; thin structures are smoothed.",
        "- Inputs must be preprocessed exactly as for the classifier (size and normalisation above).", "",
        "## Links", "", *links, "",
        "## Citation", "", "```bibtex", CITATION, "```", "",
    ]
    return "\n".join(lines)


def repo_id_problem(name: str) -> str | None:
    """Why ``name`` is not a Hub model id ``owner/name``, or None when it is one. A bare
    ``name`` is a Hub id too, but here it is more likely a mistyped folder or a missing owner."""
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        return str(err)
    return None if name.count("/") == 1 else "expected 'owner/name'"


def check_folder(folder: Path, what: str = "name_or_folder") -> Path:
    """``folder`` when it holds an explainer's config and safetensors weights; else an error
    naming ``what`` that says what is missing (and refuses a folder of pickles, saying why)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: {folder} is not a folder")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{what}: {folder} has no {CONFIG_NAME}; is it an explainer folder?")
    if not (folder / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{what}: {folder} has only pickle checkpoint(s) {pickles}; they are refused because loading a "
                f"pickle can run arbitrary code. Save weights as {WEIGHTS_NAME} (Explainer.save_pretrained)"
            )
        raise FileNotFoundError(f"{what}: {folder} has no {WEIGHTS_NAME} (only safetensors weights are loaded)")
    return folder


def resolve_folder(name_or_folder: str | os.PathLike, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                   force_download: bool = False, local_files_only: bool = False) -> Path:
    """A local folder holding the explainer's files: the path itself when it is a folder,
    else the Hub snapshot of that repo id (downloaded, or from the cache when offline)."""
    path = Path(name_or_folder)
    if path.is_dir():
        return check_folder(path)
    name = str(name_or_folder)
    problem = repo_id_problem(name)
    if problem:
        raise FileNotFoundError(f"name_or_folder: {name} is neither a folder nor a Hub repo id ({problem})")
    return check_folder(snapshot_folder(name, revision=revision, cache_dir=cache_dir, token=token,
                                        force_download=force_download, local_files_only=local_files_only,
                                        what="name_or_folder"))


def snapshot_folder(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    token: str | bool | None = None, what: str = "repo_id", force_download: bool = False,
                    local_files_only: bool = False) -> Path:
    """The local snapshot of a Hub model repo's config, weights and card (never its pickles):
    downloaded, or from the cache (only the cache with ``HF_HUB_OFFLINE=1`` or
    ``local_files_only``). Any failure is a ``FileNotFoundError`` naming ``what`` and the repo,
    with the Hub's reason."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                      allow_patterns=HUB_FILES, force_download=force_download,
                                      local_files_only=local_files_only))
    except Exception as err:  # offline and not cached, no such repo or revision, gated, a timeout...
        raise FileNotFoundError(f"{what}: could not get Hub repo {repo_id!r} (revision {revision or 'main'}): {err}") from err


# ------------------------------------------------------ this project's pretrained explainers

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
_cache: dict[tuple[str, str | None, str], "Explainer"] = {}
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


def load_explainer(name_or_folder: str | os.PathLike, revision: str | None = None, **kwargs: Any) -> "Explainer":
    """:meth:`Explainer.from_pretrained`, as a function: a new module of the caller's own."""
    from .explainer import Explainer

    return Explainer.from_pretrained(name_or_folder, revision=revision, **kwargs)


def shared_explainer(name_or_folder: str | os.PathLike, revision: str | None = None,
                     device: str | torch.device = "cpu") -> "Explainer":
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


def known_explainer_for(classifier: object, input_shape: tuple[int, ...], device: str | torch.device) -> "Explainer | None":
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
