"""Why the blur of the alternative image always runs in float32: its grouped convolution timed
in float32 (default layout) against bf16 on channels-last images, the layout and precision the
rest of a CPU training step uses.

    python benchmarks/blur_precision.py                  # 8 images of 128 px; the bf16 row takes minutes

It times the two 1-D passes ``blackbox_saliency.evidence.gaussian_blur`` makes (sigma scaled from
the paper's 10 at 224 px), with the library's float32 guard left out, one run each after one
untimed run of the float32 path. The bf16 path is timed once, without a warm-up: it is the slow one.
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import date

import torch
import torch.nn.functional as F

from blackbox_saliency.evidence import blur_sigma_for
from blackbox_saliency._precision import describe_cpu


def blur_passes(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """The library's two grouped 1-D convolutions, in whatever dtype and layout ``images`` has."""
    radius = min(int(math.ceil(3.0 * sigma)), images.shape[-2] - 1, images.shape[-1] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def timed(images: torch.Tensor, sigma: float) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        blur_passes(images, sigma)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for name, value, least in (("--images", args.images, 1), ("--size", args.size, 2), ("--threads", args.threads, 1)):
        if value < least:
            parser.error(f"{name}: expected at least {least}, got {value}")
    torch.set_num_threads(args.threads)
    images = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    sigma = blur_sigma_for(args.size, args.size)
    print(f"Command: `python benchmarks/blur_precision.py --images {args.images} --size {args.size} --threads "
          f"{args.threads}`; machine: {describe_cpu()} CPU, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}; date: {date.today()}\n")
    print("| blur of the alternative image, grouped convolution | seconds |")
    print("| --- | --- |")
    timed(images, sigma)  # warm-up of the float32 path
    # each row as soon as it is timed: the bf16 one may be stopped before it ends
    print(f"| float32, default layout (what the library runs) | {timed(images, sigma):.3f} |", flush=True)
    bf16 = timed(images.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), sigma)
    print(f"| bf16, channels-last | {bf16:.3f} |", flush=True)


if __name__ == "__main__":
    main()
