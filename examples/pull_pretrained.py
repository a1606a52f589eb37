"""Pull a pretrained explainer from the Hugging Face Hub and explain images with it.

    python examples/pull_pretrained.py --repo-id blackbox-saliency/explainer-planted-demo

``Explainer.from_pretrained`` takes a Hub repo id (downloaded once into the Hub cache; with
``HF_HUB_OFFLINE=1`` only the cache is used) or a local folder, such as ``blackbox_saliency/weights/explainer-*`` in
this repository. The demo explainer explains the planted-pattern classifier of
``blackbox_saliency.testing``, so this script runs anywhere, offline, in seconds.
"""

import argparse
from pathlib import Path

import torch

from blackbox_saliency import Explainer, explain
from blackbox_saliency.metrics import localisation_error
from blackbox_saliency.hub import WEIGHTS_FOLDER
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns
from blackbox_saliency.visualize import saliency_panel

LOCAL = WEIGHTS_FOLDER / "explainer-planted-demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo-id", default="blackbox-saliency/explainer-planted-demo")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--out", type=Path, default=Path("saliency-out"))
    args = parser.parse_args()

    try:
        explainer = Explainer.from_pretrained(args.repo_id, revision=args.revision)
        print(f"loaded {args.repo_id} from the Hub (or its cache)")
    except FileNotFoundError as err:  # offline and not cached: use the copy in this repository
        print(f"{err}\nusing the local copy {LOCAL}")
        explainer = Explainer.from_pretrained(LOCAL)
    print(f"it explains: {explainer.config.classifier.name}")

    classifier = PatternClassifier(patch=12)
    data = PlantedPatterns(16, patch=12, seed=123)
    masks = explain(classifier, data.images, data.labels, explainer=explainer)
    boxes = [box[None] for box in data.boxes]
    print(f"localisation error on 16 new images: {localisation_error(masks, boxes):.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        pixels = (data.images[i] * 0.5 + 0.5).clamp(0, 1)
        up = lambda t: torch.nn.functional.interpolate(t[None], scale_factor=4)[0]  # noqa: E731
        saliency_panel(up(pixels), up(masks[i]), f"pattern {int(data.labels[i])}").save(args.out / f"planted{i}.png")
    print(f"wrote 4 pictures to {args.out}")


if __name__ == "__main__":
    main()
