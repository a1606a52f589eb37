"""Train an explainer for your own timm classifier with one call, and check it on photographs it never saw.

    # once: fetch the Imagenette snapshot and extract it (benchmarks/imagenette.py says how)
    python examples/fit_custom_classifier.py --out my-explainer

"Your" classifier here is what a user brings: timm's EfficientNet-Lite0 with a new 10-class head
fitted on Imagenette's photographs (``benchmarks/imagenette.py``). The explainer comes from
``fit_explainer(classifier, dataset)`` and nothing else: the ``"auto"`` recipe picks ``"timm"``
for a timm classifier with a linear head. The script then scores it on 500 held-out ImageNet
validation photographs with their true boxes, beside the centre box and Grad-CAM, and saves it
with its scores in the model card. docs/fit.md gives its measured scores, time and memory.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from imagenette import baseline_methods, imagenette_classifier, load_imagenette, score_explainer  # noqa: E402

from blackbox_saliency import fit_explainer  # noqa: E402
from blackbox_saliency.datasets import DecodedImages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the explainer is saved")
    parser.add_argument("--imagenette", type=Path, default=None, help="the extracted Imagenette folder")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    args = parser.parse_args()

    data = load_imagenette(args.imagenette)
    classifier = imagenette_classifier(data)  # your classifier: any timm model with a linear head
    cfg = classifier.pretrained_cfg
    train = DecodedImages(data.train.images, data.train.labels, cfg["input_size"][-2:], cfg["mean"], cfg["std"])

    start = time.perf_counter()
    explainer = fit_explainer(classifier, train, steps=args.steps)  # steps=None: the recipe's
    print(f"trained in {(time.perf_counter() - start) / 60:.1f} min (recipe {explainer.config.training['recipe']!r})")

    @torch.no_grad()
    def masks(images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return explainer(images, class_ids)

    held = data.heldout
    methods = {"this explainer": (masks, True), **baseline_methods(classifier)}
    rows = []
    print("| method | localisation error | saliency metric | mean mask, absent class |\n| --- | --- | --- | --- |")
    for name, (method, takes_class) in methods.items():
        s = score_explainer(classifier, method, held.images, held.labels, held.boxes, takes_class=takes_class)
        absent = "" if s["absent_class_mean_mask"] is None else f"{s['absent_class_mean_mask']:.3f}"
        print(f"| {name} | {s['localisation_error']:.1%} | {s['saliency_metric']:.3f} | {absent} |", flush=True)
        rows.append({"method": name, **{k: s[k] for k in ("localisation_error", "saliency_metric",
                                                          "absent_class_mean_mask")}})
    explainer.config.evaluation = {"data": f"{len(held)} held-out ImageNet validation photographs in Imagenette, "
                                           "true label and boxes", "results": rows}
    explainer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
