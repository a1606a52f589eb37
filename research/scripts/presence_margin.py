"""What centring the class scores costs: true-class masks against absent-class masks, per margin.

    python benchmarks/presence_margin.py --explainer blackbox_saliency/weights/explainer-efficientnet_lite0 \
        --centre-pack ../shared/data/tiny-imagenet-200-train-a.tar.gz --pack ../shared/data/imagenet-samples.tar.gz

Centres the explainer's class scores on ``--centre-images`` training images
(``Explainer.centre_presence``, as ``hub/centre_presence.py`` does), then moves the reference by
each ``--margins`` value (higher: more classes called present) and scores the ImageNet sample
photographs: the true class's mean mask and the share of its masks that come out empty (mean
below 0.01), the mean mask of a random absent class (the draw of ``benchmarks/evaluate.py``), and
their ratio. The first row is the explainer as it was, uncentred. No margin is best: it trades
empty masks for the true class against masks for absent ones.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from argparse import Namespace
from datetime import date
from pathlib import Path

import torch
from torchvision import transforms

from blackbox_saliency import Explainer, load_classifier
from blackbox_saliency.datasets import TinyImageNet
from blackbox_saliency._precision import describe_cpu

from evaluate import check_explainer_args, load_data


def mask_means(explainer: Explainer, images: torch.Tensor, class_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(N,)`` mean mask per image for its class."""
    with torch.no_grad():
        return torch.cat([explainer(images[i : i + batch_size], class_ids[i : i + batch_size]).mean((1, 2, 3))
                          for i in range(0, len(images), batch_size)])


def margin_rows(explainer: Explainer, images: torch.Tensor, labels: torch.Tensor, absent: torch.Tensor,
                centre_on: torch.Tensor, margins: list[float], batch_size: int) -> list[dict[str, object]]:
    """One row uncentred, then one per margin after centring on ``centre_on``; the explainer is
    left as it came (uncentred)."""
    rows = []
    reference = explainer.centre_presence(centre_on, batch_size)
    settings = [("uncentred", None)] + [(f"centred, margin {m:+g}", reference + m) for m in margins]
    try:
        for name, value in settings:
            explainer.masking_model.feature_filter.presence_reference = value
            true, other = (mask_means(explainer, images, ids, batch_size) for ids in (labels, absent))
            rows.append({"scores": name, "reference": value, "true mean": true.mean().item(),
                         "true empty": (true < 0.01).float().mean().item(), "absent mean": other.mean().item()})
    finally:
        explainer.masking_model.feature_filter.presence_reference = None
        explainer.config.presence_reference = None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explainer", required=True, help="an uncentred explainer: folder or Hub id")
    parser.add_argument("--centre-pack", type=Path, required=True, help="a Tiny ImageNet train pack to centre on")
    parser.add_argument("--centre-images", type=int, default=600)
    parser.add_argument("--pack", type=Path, required=True, help="the ImageNet samples pack")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=700)
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    check_explainer_args(parser, args, ("limit", "batch_size", "centre_images"))
    classifier, preprocess = load_classifier("efficientnet_lite0")
    explainer = Explainer.from_pretrained(args.explainer).eval()
    if explainer.config.presence_reference is not None:
        parser.error("--explainer: already centred; give the uncentred one")
    images, labels, _ = load_data(Namespace(data="imagenet-samples", pack=args.pack, cache=args.cache,
                                            limit=args.limit, seed=args.seed), classifier, preprocess)
    g = torch.Generator().manual_seed(args.seed + 1)  # the absent classes evaluate.py draws
    absent = (labels + torch.randint(1, 1000, labels.shape, generator=g)) % 1000
    size = images.shape[-1]
    info = explainer.config.classifier
    tf = transforms.Compose([transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    train = TinyImageNet(args.centre_pack, split="train", transform=tf, cache_dir=args.cache)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.centre_images]
    centre_on = torch.stack([train[i][0] for i in order.tolist()])

    print("Command: `python benchmarks/presence_margin.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "`  ")
    print(f"Machine: {describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
          f"date: {date.today()}.\n")
    print("| scores | reference | true class: mean mask | true class: empty masks | absent class: mean mask | absent / true |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in margin_rows(explainer, images, labels, absent, centre_on, args.margins, args.batch_size):
        shown = "none" if row["reference"] is None else f"{row['reference']:.3f}"
        print(f"| {row['scores']} | {shown} | {row['true mean']:.3f} | {row['true empty']:.3f} | {row['absent mean']:.3f} "
              f"| {row['absent mean'] / row['true mean']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
