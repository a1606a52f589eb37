"""Explain a timm classifier's predictions on your own images.

    python examples/explain_timm_model.py examples/images/*.jpg --out saliency-out

Uses the default ImageNet classifier (EfficientNet-Lite0, weights from the ``lite0`` extra).
Any timm model works the same way: build it, put it in eval mode, preprocess images as it
expects, and call ``explain``. Without a trained explainer the masks come from the iterative
optimisation (about half a minute per image on a laptop CPU); pass ``--explainer FOLDER`` to
use one trained with ``fit_explainer`` (one forward pass per image).
"""

import argparse
from pathlib import Path

import torch
from PIL import Image

from blackbox_saliency import Explainer, explain, load_classifier
from blackbox_saliency.classifiers import imagenet_class_names
from blackbox_saliency.visualize import denormalize, saliency_panel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("saliency-out"))
    parser.add_argument("--explainer", type=Path, default=None, help="folder of a trained explainer")
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps without an explainer")
    args = parser.parse_args()

    model, preprocess = load_classifier("efficientnet_lite0")  # or: timm.create_model(name, pretrained=True).eval()
    images = torch.stack([preprocess(Image.open(path)) for path in args.images])
    with torch.no_grad():
        predicted = model(images).argmax(1)  # explain the top-1 class of each image

    if args.explainer:
        masks = explain(model, images, predicted, explainer=Explainer.from_pretrained(args.explainer))
    else:
        masks = explain(model, images, predicted, method="optimize", steps=args.steps)

    names = imagenet_class_names()
    args.out.mkdir(parents=True, exist_ok=True)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    for path, image, mask, cls in zip(args.images, images, masks, predicted.tolist()):
        title = f"{names[cls]}: mask area {mask.mean():.2f}"
        target = args.out / f"{path.stem}_saliency.png"
        saliency_panel(denormalize(image, mean, std), mask, title).save(target)
        print(f"{path.name}: {title} -> {target}")


if __name__ == "__main__":
    main()
