"""Which images' class survives a whole-image blur? The share ``removed_peak_skip_background`` leaves out.

    python benchmarks/blur_survival.py --pack ../shared/data/cifar10-jpeg.tar.gz --threshold 0.5

For the CIFAR-10 training images the shipped explainer trains on (all but the 5,000 that
``hub/train_cifar10.py`` holds out), the shipped classifier's probability for each image's label
once the whole image is blurred (the paper's sigma scaled to 32 px, the removed peak's
alternative image), and per class the share at or above ``--threshold``: the images that
``fit_explainer(..., removed_peak_skip_background=T)`` leaves out of the removed-peak loss. A
class the classifier names on blurred images whatever they showed cannot be destroyed by
removing evidence. Also how often each class is the top class of a blurred image.

Float32 here; training runs the classifier in bf16 where that is faster, so a probability near
the threshold may fall on the other side there.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))
from train_cifar10 import CIFAR10_CLASSES, heldout_split, load_pack, normalise  # noqa: E402

from blackbox_saliency import load_classifier  # noqa: E402
from blackbox_saliency.evidence import blur_sigma_for, gaussian_blur  # noqa: E402
from blackbox_saliency._precision import describe_cpu  # noqa: E402


@torch.no_grad()
def blurred_probabilities(classifier, images: torch.Tensor, labels: torch.Tensor,
                          batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's label probability and top class with the whole image blurred."""
    probs, tops = [], []
    for start in range(0, len(labels), batch_size):
        x = normalise(images[start : start + batch_size])
        p = classifier(gaussian_blur(x, blur_sigma_for(*x.shape[-2:]))).float().softmax(1)
        probs.append(p.gather(1, labels[start : start + batch_size, None])[:, 0])
        tops.append(p.argmax(1))
    return torch.cat(probs), torch.cat(tops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, required=True, help="the CIFAR-10 pack (../shared/data/cifar10-jpeg.tar.gz)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not 0 < args.threshold <= 1:
        parser.error(f"--threshold: expected a probability in (0, 1], got {args.threshold!r}")
    if not args.pack.is_file():
        parser.error(f"--pack: {args.pack} is not a file")
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = load_pack(args.pack)["train"]
    rows, _ = heldout_split(labels)
    images, labels = images[rows], labels[rows]
    classifier, _ = load_classifier("cifar10")
    classifier.eval()
    prob, top = blurred_probabilities(classifier, images, labels)
    survives = prob >= args.threshold
    print(f"Command: `python benchmarks/blur_survival.py {' '.join(map(shlex.quote, sys.argv[1:]))}`; machine: "
          f"{describe_cpu()}, {torch.get_num_threads()} threads; torch {torch.__version__}; date: {date.today()}\n")
    print(f"{len(labels):,} CIFAR-10 training images (the held-out 5,000 excluded), each blurred whole (sigma "
          f"{blur_sigma_for(32, 32):.2f} px), shipped classifier, float32. Overall {survives.float().mean():.1%} keep "
          f"their label's probability >= {args.threshold:g}.\n")
    print(f"| class | images | share with p(label) >= {args.threshold:g} once blurred | mean p(label) once blurred "
          "| share of all blurred images with this top class |")
    print("| --- | --- | --- | --- | --- |")
    for c, name in enumerate(CIFAR10_CLASSES):
        mine = labels == c
        print(f"| {name} | {int(mine.sum()):,} | {survives[mine].float().mean():.1%} | {prob[mine].mean():.3f} "
              f"| {(top == c).float().mean():.1%} |")


if __name__ == "__main__":
    main()
