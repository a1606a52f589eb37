"""Does a Lite0 explainer trained on Tiny ImageNet explain classes it never trained on?

    python benchmarks/class_coverage.py --explainer blackbox_saliency/weights/explainer-efficientnet_lite0 \
        --pack ../shared/data/imagenet-samples.tar.gz --tiny-pack ../shared/data/tiny-imagenet-200-val.tar.gz

Tiny ImageNet holds 200 of ImageNet's 1000 classes; the 700 ImageNet sample photographs hold
700 classes, about a fifth of them among those 200. An explainer trained with the Tiny labels
(``class_source="label"``) has class embeddings trained for those 200 classes only; one trained
on the classifier's own predictions (``class_source="prediction"``) sees whatever Lite0 predicts
on Tiny images, which spans most of the 1000. This splits the photographs by whether their class
is one of Tiny's 200 and scores each part at 224 px: the saliency metric of the mask's tightest
box (beside the whole image's and the centre box's), the mean mask for the true class and for a
random absent class, and the class probability on the preserved and the removed image (blurred
alternative, as ``benchmarks/evaluate.py``). Prints a markdown table with the command, machine
and date.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from blackbox_saliency import Explainer, load_classifier
from blackbox_saliency.baselines import BASELINES
from blackbox_saliency.datasets import ImageNetSamples, extract_pack, imagenet_wnid_to_index
from blackbox_saliency.metrics import saliency_metric
from blackbox_saliency._precision import describe_cpu
from evaluate import probabilities  # benchmarks/evaluate.py, beside this script


def tiny_classes(pack: Path, cache: Path | None) -> set[int]:
    """ImageNet-1k indices of Tiny ImageNet's 200 classes (its ``wnids.txt``)."""
    wnids = next(extract_pack(pack, cache).rglob("wnids.txt")).read_text().split()
    index = imagenet_wnid_to_index()
    return {index[w] for w in wnids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explainer", action="append", required=True, help="folder or Hub id; repeat to compare")
    parser.add_argument("--pack", type=Path, required=True, help="imagenet-samples pack or folder")
    parser.add_argument("--tiny-pack", type=Path, required=True, help="any Tiny ImageNet pack (for wnids.txt)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, preprocess = load_classifier("efficientnet_lite0")
    data = ImageNetSamples(args.pack, transform=preprocess, cache_dir=args.cache)
    seen = tiny_classes(args.tiny_pack, args.cache)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor(data.labels)
    absent = (labels + torch.randint(1, 1000, labels.shape, generator=torch.Generator().manual_seed(args.seed + 1))) % 1000
    parts = {"class among Tiny ImageNet's 200": torch.tensor([int(y) in seen for y in labels])}
    parts["class not among them"] = ~parts["class among Tiny ImageNet's 200"]
    explainers = {name: Explainer.from_pretrained(name).eval() for name in args.explainer}

    def masks_of(explainer, ids):
        with torch.no_grad():
            return torch.cat([explainer(images[i : i + 25], ids[i : i + 25]) for i in range(0, len(images), 25)])

    all_masks = {name: (masks_of(e, labels), masks_of(e, absent)) for name, e in explainers.items()}
    centre = BASELINES["centre box"](model, images, labels)
    whole = torch.ones_like(centre)
    rows = []
    for part, rows_mask in parts.items():
        x, y = images[rows_mask], labels[rows_mask]
        score = lambda m: saliency_metric(model, x, m[rows_mask], y).mean().item()  # noqa: E731
        rows.append(f"| {part} | {int(rows_mask.sum())} | whole image | {score(whole):.3f} | | | | |")
        rows.append(f"| {part} | {int(rows_mask.sum())} | centre box | {score(centre):.3f} | | | | |")
        for name, (true_masks, absent_masks) in all_masks.items():
            kept, removed = probabilities(model, x, true_masks[rows_mask], y)
            rows.append(f"| {part} | {int(rows_mask.sum())} | `{name}` | {score(true_masks):.3f} | "
                        f"{true_masks[rows_mask].mean():.3f} | {absent_masks[rows_mask].mean():.3f} | {kept:.3f} | {removed:.3f} |")
    command = "python benchmarks/class_coverage.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"Command: `{command}`  \nMachine: {describe_cpu()}, {torch.get_num_threads()} CPU threads, "
          f"torch {torch.__version__}; date: {date.today()}.\n")
    print("| images | count | method | saliency metric | mean mask, true class | mean mask, absent class "
          "| p preserved | p removed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
