"""Training images per second the data path alone can feed: per-item decoding against ``DecodedImages``.

    python benchmarks/loader_throughput.py --pack ../shared/data/tiny-imagenet-200-train-a.tar.gz

Two ways to feed batches of Tiny ImageNet training images at ``--size`` px, timed alone (no
training step):

- per item: ``TinyImageNet`` with torchvision transforms (JPEG decode, random resized crop with
  bicubic resampling, to tensor, normalise) in a ``DataLoader`` with ``--workers`` workers, as a
  training script without this library's data helpers would;
- decoded once: ``DecodedImages.decode`` (timed on its own) then ``batch(indices)``, which crops
  and resizes a whole batch on the uint8 tensor, as ``fit_explainer`` reads it.

The first batch of each is not timed (worker start-up, first allocation).
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from blackbox_saliency.datasets import DecodedImages, TinyImageNet
from blackbox_saliency._precision import describe_cpu


def per_item_rate(data: TinyImageNet, size: int, batch: int, batches: int, workers: int) -> float:
    data.transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batch * batches / (time.perf_counter() - start)


def decoded_rates(data: TinyImageNet, size: int, batch: int, batches: int, images: int) -> tuple[float, float]:
    """Images decoded per second, and training images per second from the decoded tensor."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:images].tolist()
    start = time.perf_counter()
    decoded = DecodedImages.decode(Subset(data, order), size, crop_scale=(0.35, 1.0), progress=False)
    decode_rate = len(decoded) / (time.perf_counter() - start)
    g = torch.Generator().manual_seed(1)
    draws = [torch.randint(0, len(decoded), (batch,), generator=g) for _ in range(batches + 1)]
    decoded.batch(draws[0])
    start = time.perf_counter()
    for rows in draws[1:]:
        decoded.batch(rows)
    return decode_rate, batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, required=True, help="a Tiny ImageNet train pack or its folder")
    parser.add_argument("--cache", type=Path, default=None, help="where packs are extracted")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches of each path")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the per-item path")
    parser.add_argument("--decode-images", type=int, default=5000, help="images DecodedImages decodes (timed)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for name in ("size", "batch", "batches", "decode_images", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if args.workers < 0:
        parser.error(f"--workers: must be 0 or more, got {args.workers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = TinyImageNet(args.pack, split="train", cache_dir=args.cache)
    item = per_item_rate(data, args.size, args.batch, args.batches, args.workers)
    data.transform = None
    decode, batched = decoded_rates(data, args.size, args.batch, args.batches, min(args.decode_images, len(data)))
    print(f"Tiny ImageNet train images ({len(data)} in the pack) at {args.size} px, batch {args.batch}, "
          f"{args.batches} timed batches; {describe_cpu()} CPU, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; date: {date.today()}\n")
    print("| data path | images/s |")
    print("| --- | --- |")
    print(f"| per item: JPEG decode + random resized crop (bicubic) in a DataLoader, {args.workers} worker(s) "
          f"| {item:.1f} |")
    print(f"| DecodedImages.decode: JPEG to uint8 tensor, once ({min(args.decode_images, len(data))} images) "
          f"| {decode:.1f} |")
    print(f"| DecodedImages.batch: random crops resized on the tensor | {batched:.1f} |")


if __name__ == "__main__":
    main()
