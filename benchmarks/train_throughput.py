"""Training images per second of ``fit_explainer`` on one device, and peak GPU memory.

    python benchmarks/train_throughput.py                        # the CPU here (few steps)
    python benchmarks/train_throughput.py --device cuda          # a GPU

Two set-ups, each the paper's:

- CIFAR-10 variant: 32 px, the small random-init encoder (3 blocks of 5 convs, widths 64/128/256)
  against a ResNet-9 classifier, with the data preloaded on the device (``preload=True``) and,
  for comparison, streamed by a DataLoader.
- ImageNet-sized: 224 px, a frozen ResNet-50 encoder against a ResNet-50 classifier, streamed.

Images are random tensors held in memory (speed does not depend on their content, and the
streamed rows then measure the loader's collation, not JPEG decoding; decoding needs enough
``num_workers``, see docs/distributed.md). Weights are random for the same reason. The rate is
``(steps_long - steps_short) * batch / (time_long - time_short)`` over two runs, which takes
out model building, warm-up and ``torch.compile``-free start-up costs.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import timm
import torch
from torch.utils.data import Dataset

from blackbox_saliency import fit_explainer
from blackbox_saliency.classifiers import CifarResNet


class RandomImages(Dataset):
    """``n`` images of one size with random labels, drawn from a pool of ``pool`` random images
    held in memory (a long epoch without gigabytes of noise)."""

    def __init__(self, n: int, size: int, num_classes: int, pool: int = 512):
        generator = torch.Generator().manual_seed(0)
        self.pool = torch.randn(min(n, pool), 3, size, size, generator=generator)
        self.labels = torch.randint(0, num_classes, (n,), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.pool[index % len(self.pool)], self.labels[index]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_fit(classifier, data, steps: int, batch: int, device: str, **kwargs) -> float:
    sync(device)
    start = time.perf_counter()
    fit_explainer(classifier, data, epochs=10_000, max_steps=steps, batch_size=batch, device=device, seed=0,
                  progress=False, **kwargs)
    sync(device)
    return time.perf_counter() - start


def measure(classifier, data, short: int, long: int, batch: int, device: str, **kwargs) -> tuple[float, float | None]:
    """Images per second and peak GPU memory (GiB) of the longer run."""
    t_short = timed_fit(classifier, data, short, batch, device, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_long = timed_fit(classifier, data, long, batch, device, **kwargs)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return (long - short) * batch / (t_long - t_short), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cifar-batch", type=int, default=None, help="default 128 on a GPU, 32 on the CPU")
    parser.add_argument("--imagenet-batch", type=int, default=None, help="default 64 on a GPU, 4 on the CPU")
    parser.add_argument("--steps", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                        help="steps of the two timed runs; default 20 120 on a GPU, 2 6 on the CPU")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the streamed rows")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    cifar_batch = args.cifar_batch or (128 if gpu else 32)
    imagenet_batch = args.imagenet_batch or (64 if gpu else 4)
    short, long = args.steps or ((20, 120) if gpu else (2, 6))
    torch.manual_seed(0)

    rows = []
    cifar = RandomImages(cifar_batch * (long + 1), 32, 10, pool=50_000)
    cifar_classifier = CifarResNet().eval()
    for preload in (True, False):
        rate, peak = measure(cifar_classifier, cifar, short, long, cifar_batch, args.device, encoder="small",
                             preload=preload, num_workers=0 if preload else args.num_workers)
        rows.append((f"CIFAR-10 variant, 32 px, small encoder, data {'preloaded' if preload else 'streamed'}",
                     cifar_batch, rate, peak))
    imagenet = RandomImages(imagenet_batch * (long + 1), 224, 1000, pool=256)
    imagenet_classifier = timm.create_model("resnet50", pretrained=False).eval()
    rate, peak = measure(imagenet_classifier, imagenet, short, long, imagenet_batch, args.device, encoder="resnet50",
                         pretrained_encoder=False, freeze_encoder=True, num_workers=args.num_workers)
    rows.append(("224 px, frozen ResNet-50 encoder, ResNet-50 classifier, streamed", imagenet_batch, rate, peak))

    name = torch.cuda.get_device_name() if gpu else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
             for k, v in vars(args).items() if v not in (False, None)]
    print(f"Command: `python benchmarks/train_throughput.py {' '.join(flags)}`  ")
    print(f"Device: {name}; torch {torch.__version__}; timed runs of {short} and {long} steps"
          f"{'; bf16 autocast' if gpu else ''}; date: {date.today()}.\n")
    print("| set-up | batch | training images/s | peak GPU memory (GiB) |")
    print("| --- | --- | --- | --- |")
    for label, batch, rate, peak in rows:
        print(f"| {label} | {batch} | {rate:.1f} | {'' if peak is None else f'{peak:.1f}'} |")


if __name__ == "__main__":
    main()
