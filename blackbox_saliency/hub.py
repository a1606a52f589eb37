"""Explainers on the Hugging Face Hub: save, load, push, and a generated model card.

Files follow the Hub's conventions: ``config.json`` (plain JSON that rebuilds the model),
``model.safetensors`` (weights, loaded strictly), ``README.md`` (the model card). Pickle
checkpoints are never loaded: they can run code.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, ModelCardData, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

if TYPE_CHECKING:  # the explainer imports this module; this one never imports it back
    from .explainer import Explainer

__all__ = ["model_card", "resolve_folder", "push_to_hub", "snapshot_folder"]

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
HUB_FILES = ["config.json", "model.safetensors", CARD_NAME]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

CITATION = """@inproceedings{dabkowski2017real,
  title={Real Time Image Saliency for Black Box Classifiers},
  author={Dabkowski, Piotr and Gal, Yarin},
  booktitle={Advances in Neural Information Processing Systems},
  year={2017}
}"""


def _evaluation_markdown(evaluation: object) -> str:
    """``config["evaluation"]`` as markdown: text as it is, or ``{"data": ..., "results": [rows]}``
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


def model_card(config: dict[str, Any], repo_id: str | None = None) -> str:
    """The model card (README.md) for an explainer config: what it explains, how it was
    trained, how well it does (``config["evaluation"]``, markdown, when present), usage."""
    classifier = config.get("classifier") or {}
    training = config.get("training") or {}
    name = classifier.get("name", "an unnamed classifier")
    data = ModelCardData(
        library_name="blackbox-saliency",
        license="mit",
        tags=["saliency", "explainability", "interpretability", "image-classification", "pytorch", "blackbox-saliency"],
        pipeline_tag="image-segmentation",
    )
    load = repo_id or "path/to/this/folder"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# Saliency explainer for `{name}`", "",
        "A masking model (Dabkowski & Gal, 2017) that outputs, in one forward pass, the smallest smooth mask "
        f"that keeps the class recognisable to `{name}` and whose removal destroys it.", "",
        f"**It explains `{name}` and nothing else**: masks say what that classifier needs, so an explainer is "
        "valid only for the classifier (and preprocessing) it was trained against.", "",
        "## The classifier", "",
        f"- name: `{name}`",
        f"- input size: {classifier.get('input_size', 'not recorded')}",
        f"- normalisation: mean {classifier.get('mean', 'not recorded')}, std {classifier.get('std', 'not recorded')}",
        f"- classes: {config.get('num_classes')}", "",
        "## The explainer", "",
        f"- encoder: `{config.get('encoder')}` {json.dumps(config.get('encoder_kwargs') or {})}, "
        f"{'frozen' if config.get('freeze_encoder') else 'trained'}",
        f"- mask at 1/{config.get('mask_reduction')} of the input resolution, upsampled bilinearly",
        f"- objective: `{json.dumps(config.get('objective') or {}, sort_keys=True)}`",
        f"- training: `{json.dumps(training, sort_keys=True)}`" if training else "- training: not recorded",
        f"- training data: {config.get('training_data', 'not recorded')}", "",
        "## Evaluation", "",
        _evaluation_markdown(config.get("evaluation")), "",
        "## Usage", "",
        "```python",
        "from blackbox_saliency import Explainer, explain",
        "",
        f'explainer = Explainer.from_pretrained("{load}")',
        "masks = explain(classifier, images, class_ids, explainer=explainer)  # (N, 1, H, W) in [0, 1]",
        "```", "",
        "## Limitations", "",
        "- Masks show what the classifier uses, which need not be what a person would point at.",
        "- The mask has a quarter of the input resolution; thin structures are smoothed.",
        "- Inputs must be preprocessed exactly as for the classifier (size and normalisation above).", "",
        "## Citation", "", "```bibtex", CITATION, "```", "",
    ]
    return "\n".join(lines)


def _check_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"folder: {folder} has no config.json; is it an explainer folder?")
    if not (folder / "model.safetensors").is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"folder: {folder} has only pickle checkpoint(s) {pickles}; they are refused because loading a "
                "pickle can run arbitrary code. Save weights as model.safetensors (Explainer.save_pretrained)"
            )
        raise FileNotFoundError(f"folder: {folder} has no model.safetensors (only safetensors weights are loaded)")
    return folder


def resolve_folder(name_or_folder: str | os.PathLike, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, token: str | None = None) -> Path:
    """A local folder holding the explainer's files: the path itself when it is a folder,
    else the Hub snapshot of that repo id (downloaded, or from the cache when offline)."""
    path = Path(name_or_folder)
    if path.is_dir():
        return _check_folder(path)
    name = str(name_or_folder)
    try:
        validate_repo_id(name)
        if name.count("/") != 1:  # a bare "name" is a Hub id too, but here it is more likely a missing folder
            raise HFValidationError("expected 'owner/name'")
    except HFValidationError as err:
        raise FileNotFoundError(f"name_or_folder: {name} is neither a folder nor a Hub repo id ({err})") from err
    return _check_folder(snapshot_folder(name, revision=revision, cache_dir=cache_dir, token=token, what="name_or_folder"))


def snapshot_folder(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    token: str | None = None, what: str = "repo_id") -> Path:
    """The local snapshot of a Hub model repo's config, weights and card: downloaded, or from
    the cache (offline with ``HF_HUB_OFFLINE=1``). Any failure is a ``FileNotFoundError``
    naming ``what`` and the repo, with the Hub's reason."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                      allow_patterns=HUB_FILES))
    except Exception as err:  # offline and not cached, no such repo or revision, gated, a timeout...
        raise FileNotFoundError(f"{what}: could not get Hub repo {repo_id!r} (revision {revision or 'main'}): {err}") from err


def push_to_hub(explainer: "Explainer", repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload blackbox-saliency explainer") -> str:
    """Create the repo if needed and upload ``config.json``, ``model.safetensors`` and the
    model card in one commit. Returns the commit URL."""
    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("expected 'owner/name'")
    except HFValidationError as err:
        raise ValueError(f"repo_id: not a Hub repo id 'owner/name': {repo_id!r} ({err})") from err
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        explainer.save_pretrained(tmp, repo_id=repo_id)
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, repo_type="model")
    return str(getattr(commit, "commit_url", commit))
