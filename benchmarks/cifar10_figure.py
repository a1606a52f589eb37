"""The paper's figure 6: masks of the CIFAR-10 explainer on random CIFAR-10 test images.

    python benchmarks/cifar10_figure.py --pack ../shared/data/cifar10-jpeg.tar.gz --out docs/images/cifar10_masks.png

Each panel: the mask over the image, the preserved image and the image with the evidence
removed (blurred alternative), enlarged 4x, titled with the true class, the class explained
(the classifier's prediction, as in the paper's figure) and its probability. Images are the
first ``--count`` of a seeded shuffle of the 10,000 test images: random, not chosen.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from blackbox_saliency import Explainer, load_classifier
from blackbox_saliency.datasets import cifar10
from blackbox_saliency.hub import pretrained_for
from blackbox_saliency.visualize import denormalize, saliency_panel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, required=True, help="the CIFAR-10 pack (.tar.gz) or its extracted folder")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--explainer", default=None, help="folder or Hub repo id (default: the shipped one)")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--columns", type=int, default=2)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, preprocess = load_classifier("cifar10")
    explainer = Explainer.from_pretrained(args.explainer or pretrained_for(model))
    names = model.pretrained_cfg["class_names"]
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    data = cifar10(args.pack, "test", transform=preprocess, cache_dir=args.cache)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.count].tolist()
    images = torch.stack([data[i][0] for i in order])
    labels = [data[i][1] for i in order]
    with torch.no_grad():
        probs = model(images).softmax(1)
        predicted = probs.argmax(1)
        masks = explainer(images, predicted)
    big = lambda t: F.interpolate(t[None], scale_factor=args.scale, mode="nearest")[0]  # noqa: E731
    panels = []
    for i in range(len(order)):
        title = f"{names[labels[i]]} -> {names[predicted[i]]} p={probs[i, predicted[i]]:.2f} area {masks[i].mean():.2f}"
        panels.append(saliency_panel(big(denormalize(images[i], mean, std)), big(masks[i]), title))
    w, h = panels[0].size
    rows = -(-len(panels) // args.columns)
    sheet = Image.new("RGB", (args.columns * (w + 12), rows * (h + 8) + 20), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % args.columns) * (w + 12), 20 + (i // args.columns) * (h + 8)))
    ImageDraw.Draw(sheet).text((4, 4), f"CIFAR-10 test, random images (seed {args.seed}); mask | preserved | removed; "
                               f"{date.today()}", fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)


if __name__ == "__main__":
    main()
