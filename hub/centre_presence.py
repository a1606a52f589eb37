"""Centre a trained explainer's class scores on its training images (``Explainer.centre_presence``).

    python hub/centre_presence.py --explainer blackbox_saliency/weights/explainer-efficientnet_lite0 \
        --pack ../shared/data/tiny-imagenet-200-train-a.tar.gz --images 600 --size 224 --out OUT

An explainer whose class embedding was learnt on Tiny ImageNet's blurry 64 px images calls most
classes present on sharp photographs (docs/objective.md, "Why absent classes get masks on
photographs"). Centring takes the offset of each image's class scores from the image itself:
this measures the reference (the mean class score on ``--images`` training images drawn with
``--seed``, resized whole to ``--size``, normalised for the classifier), writes the explainer
with it to ``OUT/<the folder's name>``, and records how in ``config.training``. Nothing is
trained; it takes seconds.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import date
from pathlib import Path

import torch
from torchvision import transforms

from blackbox_saliency import Explainer
from blackbox_saliency.datasets import TinyImageNet
from blackbox_saliency._precision import describe_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explainer", type=Path, required=True, help="the trained explainer's folder")
    parser.add_argument("--pack", type=Path, required=True, help="a Tiny ImageNet train pack")
    parser.add_argument("--cache", type=Path, default=None, help="where packs are unpacked")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the centred explainer into")
    args = parser.parse_args()
    for name in ("images", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive number, got {getattr(args, name)}")
    if (args.out / args.explainer.name).resolve() == args.explainer.resolve():
        parser.error("--out: would overwrite --explainer; write elsewhere and compare first")
    if args.threads:
        torch.set_num_threads(args.threads)
    explainer = Explainer.from_pretrained(args.explainer).eval()
    if explainer.config.presence_std_threshold is not None:
        parser.error(f"--explainer: its class scores are standardised (presence_std_threshold "
                     f"{explainer.config.presence_std_threshold}), not to be centred as well")
    if explainer.config.presence_reference is not None:
        parser.error(f"--explainer: already centred (presence_reference {explainer.config.presence_reference})")
    info = explainer.config.classifier
    if not (isinstance(info.mean, list) and isinstance(info.std, list)):
        parser.error("--explainer: its config does not record the classifier's mean and std as numbers")
    tf = transforms.Compose([transforms.Resize((args.size, args.size), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    data = TinyImageNet(args.pack, split="train", transform=tf, cache_dir=args.cache)
    if args.images > len(data):
        parser.error(f"--images: the pack holds {len(data)} images, asked for {args.images}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.images].tolist()
    images = torch.stack([data[i][0] for i in order])
    reference = explainer.centre_presence(images)
    explainer.config.training = {
        **(explainer.config.training or {}),
        "presence_centring": {
            "command": "python hub/centre_presence.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "from": f"{args.explainer} (uncentred)",
            "date": str(date.today()),
            "machine": f"{describe_cpu()} CPU, {torch.get_num_threads()} threads",
            "images": f"{args.images} Tiny ImageNet train images from {args.pack.name} (seed {args.seed}), "
                      f"resized whole to {args.size} px",
            "reference": reference,
        },
    }
    explainer.save_pretrained(args.out / args.explainer.name)
    print(f"presence_reference {reference:.4f}; written to {args.out / args.explainer.name}")


if __name__ == "__main__":
    main()
