"""Push this project's published models to the Hub: every ``blackbox_saliency/weights/explainer-*``
folder and the classifiers the explainers explain (``classifier-cifar10``).

    HF_TOKEN=... python hub/push.py --owner blackbox-saliency [--private] [--dry-run]

Each folder is loaded first (safetensors, strict, config checked), so a broken folder is never
published. An explainer's model card is regenerated with the repo id in the usage example; a
classifier folder is uploaded as it is (its README is its card). ``load_classifier("cifar10")``
falls back to ``blackbox-saliency/classifier-cifar10`` when the package does not ship it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi

from blackbox_saliency import Explainer
from blackbox_saliency.classifiers import cifar10_classifier_from_folder
from blackbox_saliency.hub import WEIGHTS_FOLDER

# classifier folders published beside the explainers, each with the loader that checks it
CLASSIFIERS: dict[str, Callable[[Path], object]] = {"classifier-cifar10": cifar10_classifier_from_folder}


def push_classifier(folder: Path, repo_id: str, private: bool | None, token: str | None) -> str:
    """Upload ``folder`` as it is, in one commit, to ``repo_id`` (created if needed)."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload blackbox-saliency classifier")
    return commit.commit_url


def main(argv: list[str] | None = None, weights: Path = WEIGHTS_FOLDER) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owner", default="blackbox-saliency", help="Hub user or organisation")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN or the logged-in token")
    parser.add_argument("--dry-run", action="store_true", help="load and check every folder, push nothing")
    args = parser.parse_args(argv)
    explainers = sorted(p for p in weights.glob("explainer-*") if p.is_dir())
    classifiers = [weights / name for name in sorted(CLASSIFIERS) if (weights / name).is_dir()]
    if not explainers and not classifiers:
        raise SystemExit(f"no explainer-* or classifier folders in {weights}")
    checked = [(folder, Explainer.from_pretrained(folder)) for folder in explainers]
    checked += [(folder, CLASSIFIERS[folder.name](folder)) for folder in classifiers]  # all load before any push
    for folder, model in checked:
        repo_id = f"{args.owner}/{folder.name}"
        if args.dry_run:
            print(f"{folder.name}: ok, would push to {repo_id}")
        elif isinstance(model, Explainer):
            print(f"{folder.name} -> {model.push_to_hub(repo_id, private=args.private or None, token=args.token)}")
        else:
            print(f"{folder.name} -> {push_classifier(folder, repo_id, args.private or None, args.token)}")


if __name__ == "__main__":
    main()
