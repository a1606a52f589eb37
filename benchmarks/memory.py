"""Peak memory of explaining many images on the CPU: ``explain`` works through the batch in
chunks of ``batch_size``, so memory beyond the inputs and the masks stays bounded.

    python benchmarks/memory.py --images 1000 --batch-size 32

Builds an explainer on the EfficientNet-Lite0 feature pyramid (weights do not change the
memory) and explains ``--images`` random 224 px images, reporting the peak resident memory
before and after, and the size of the inputs and the masks themselves.
"""

import argparse
import resource
import time
from datetime import date

import torch

from blackbox_saliency import Explainer, explain
from blackbox_saliency._precision import describe_cpu


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    explainer = Explainer(num_classes=1000, encoder="efficientnet_lite0", pretrained_encoder=False).eval()
    classifier = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1000))
    images = torch.randn(args.images, 3, 224, 224)
    ids = torch.randint(0, 1000, (args.images,))
    before = peak_mib()
    start = time.perf_counter()
    masks = explain(classifier, images, ids, explainer=explainer, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    after = peak_mib()
    mib = lambda t: t.numel() * t.element_size() / 2**20  # noqa: E731
    print(f"{args.images} images at 224 px, batch_size {args.batch_size}: peak RSS {before:.0f} MiB before explain, "
          f"{after:.0f} MiB after (+{after - before:.0f} MiB); inputs {mib(images):.0f} MiB, masks {mib(masks):.0f} MiB; "
          f"{args.images / seconds:.1f} masks/s. Machine: {describe_cpu()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {date.today()}.")


if __name__ == "__main__":
    main()
