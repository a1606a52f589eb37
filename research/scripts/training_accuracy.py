"""How often does EfficientNet-Lite0 name the label of the Tiny ImageNet images an explainer trains on?

    python benchmarks/training_accuracy.py --packs ../shared/data/tiny-imagenet-200-train-a.tar.gz --limit 2000

The mask stage asks for a mask that keeps the labelled class recognisable. On an image where the
classifier does not name that class even unmasked, no mask can: such images only teach the area
term to win. This measures, on a seeded sample of training images decoded as
``hub/train_lite0.py`` decodes them (``DecodedImages``), Lite0's top-1 accuracy, the share whose
logit margin for the label is at least 1 (the preserve hinge's margin) and the mean probability
of the label: at the training size with whole images and with the training script's random
crops, and at the classifier's 224 px. It is the share of images ``class_source="correct"``
keeps. Prints a markdown table with the command, machine and date.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from blackbox_saliency import load_classifier
from blackbox_saliency.datasets import DecodedImages, TinyImageNet
from blackbox_saliency._precision import describe_cpu


def measure(classifier, decoded: DecodedImages, batch: int = 100) -> dict[str, float]:
    correct, margins, probs = [], [], []
    with torch.no_grad():
        for start in range(0, len(decoded), batch):
            images, labels = decoded.batch(torch.arange(start, min(start + batch, len(decoded))))
            logits = classifier(images).float()
            picked = logits.gather(1, labels[:, None]).squeeze(1)
            rival = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
            correct.append(logits.argmax(1) == labels)
            margins.append(picked - rival)
            probs.append(logits.softmax(1).gather(1, labels[:, None]).squeeze(1))
    margin = torch.cat(margins)
    return {"top-1": torch.cat(correct).float().mean().item(), "margin >= 1": (margin >= 1).float().mean().item(),
            "mean p(label)": torch.cat(probs).mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", type=Path, nargs="+", required=True, help="Tiny ImageNet train packs")
    parser.add_argument("--cache", type=Path, default=None, help="where packs are unpacked")
    parser.add_argument("--limit", type=int, default=2000, help="images, a seeded sample")
    parser.add_argument("--size", type=int, default=128, help="the training resolution")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.35, 1.0), help="the training crops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.limit < 1:
        parser.error(f"--limit: expected a positive number of images, got {args.limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the random crops
    classifier, _ = load_classifier("efficientnet_lite0")
    mean, std = classifier.pretrained_cfg["mean"], classifier.pretrained_cfg["std"]
    data = TinyImageNet(args.packs, split="train", cache_dir=args.cache)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.limit]
    sample = torch.utils.data.Subset(data, order.tolist())
    rows = []
    for size, crop in ((args.size, (1.0, 1.0)), (args.size, tuple(args.crop_scale)), (224, (1.0, 1.0))):
        decoded = DecodedImages.decode(sample, size, mean, std, crop_scale=crop, progress=False)
        rows.append((size, crop, measure(classifier, decoded)))
    print(f"Command: `python benchmarks/training_accuracy.py {shlex.join(sys.argv[1:])}`; machine: "
          f"{describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; date: {date.today()}\n")
    print(f"| input ({len(order)} training images) | top-1 | margin >= 1 | mean p(label) |")
    print("| --- | --- | --- | --- |")
    for size, crop, values in rows:
        where = "whole image" if crop == (1.0, 1.0) else f"random crops of {crop[0]:.2f}-{crop[1]:.2f} of the area"
        print(f"| {size} px, {where} | {values['top-1']:.3f} | {values['margin >= 1']:.3f} | {values['mean p(label)']:.3f} |")


if __name__ == "__main__":
    main()
