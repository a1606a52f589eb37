"""Training images per second of ``fit_explainer``, end to end from the data packs.

    python benchmarks/train_throughput.py                    # the CPU here, about 10 minutes
    python benchmarks/train_throughput.py --device cuda      # a GPU (adds peak memory)

Rows, each the library's own training step fed the library's own way (images decoded once into
memory as uint8 by ``DecodedImages`` and resized per batch, no loader):

- EfficientNet-Lite0 explainer: the Lite0 black box (random weights if the ``lite0`` extra is
  missing; speed does not depend on them) with its own frozen feature pyramid as the encoder, on
  Tiny ImageNet train pack a at 128 and 224 px; on the CPU precision ``auto`` (channels-last,
  each part under bf16 autocast where timing it found that faster; the row names the choice),
  ``bf16`` (both parts, channels-last) and ``fp32`` in the default layout;
- the embedding stage of the same run (no decoder, no classifier calls);
- the CIFAR-10 variant: the small random-init encoder (3 blocks of 5 convs, widths 64/128/256,
  the default, and 32/64/128, the recipe of hub/train_cifar10.py) against a ResNet-9 (width 64),
  mask at 1/2, on CIFAR-10 train images at 32 px, the same three precisions; with
  ``--cifar-recipe`` also hub/train_cifar10.py's mask stage as it runs (encoder and class
  embedding fixed after the embedding stage, batch 64).

The rate is read from the training log (``log_every``): images/s over the steps after the first
``--warmup``, timed by the training loop itself, so model building and warm-up are not in it.
"""

from __future__ import annotations

import argparse
import logging
from datetime import date
from pathlib import Path

import timm
import torch
from torch.utils.data import Subset

from blackbox_saliency import fit_explainer
from blackbox_saliency.classifiers import CIFAR10_MEAN, CIFAR10_STD, CifarResNet
from blackbox_saliency.datasets import DecodedImages, TinyImageNet, cifar10
from blackbox_saliency.encoders import classifier_features
from blackbox_saliency._precision import describe_cpu
from blackbox_saliency.training import EARLIER_DEFAULTS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class _Rates(logging.Handler):
    """Collects the images/s of the training loop's progress lines."""

    def __init__(self):
        super().__init__()
        self.rates: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("step ") and record.args:
            self.rates.append(float(record.args[-1]))


def measure(classifier, data, batch: int, warmup: int, steps: int, device: str,
            **kwargs) -> tuple[float, float | None, str]:
    """Images per second after ``warmup`` steps (``steps`` more), peak GPU memory (GiB), and
    what ran under bf16 when ``precision="auto"`` timed the parts (else "")."""
    handler = _Rates()
    log = logging.getLogger("blackbox_saliency.training")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        explainer = fit_explainer(classifier, data, epochs=10_000, max_steps=warmup + steps, batch_size=batch, device=device,
                      seed=0, progress=False, log_every=steps if warmup == 0 else warmup, **kwargs)
    finally:
        log.removeHandler(handler)
    if warmup and steps % warmup:
        raise ValueError("--steps must be a multiple of --warmup")
    measured = handler.rates[1:] if warmup else handler.rates
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    parts = explainer.config.training.get("precision_parts")
    chosen = " (" + ", ".join(f"{part.replace('_', ' ')} {value}" for part, value in parts.items()) + ")" if parts else ""
    return sum(measured) / len(measured), peak, chosen


def lite0(random_weights: bool) -> torch.nn.Module:
    if not random_weights:
        try:
            from blackbox_saliency import load_classifier

            return load_classifier("efficientnet_lite0")[0]
        except ImportError:
            pass
    return timm.create_model("efficientnet_lite0", pretrained=False).eval()


def tiny_images(images: int, size: int) -> DecodedImages:
    pack = DATA / "tiny-imagenet-200-train-a.tar.gz"
    if pack.exists():
        data = TinyImageNet(pack, split="train")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:images].tolist()
        return DecodedImages.decode(Subset(data, order), size, progress=False)
    g = torch.Generator().manual_seed(0)  # no pack: random pixels of the same shape
    return DecodedImages(torch.randint(0, 256, (images, 3, 64, 64), dtype=torch.uint8, generator=g),
                         torch.randint(0, 1000, (images,), generator=g), size)


def cifar_images(images: int) -> DecodedImages:
    pack = DATA / "cifar10-jpeg.tar.gz"
    if pack.exists():
        data = cifar10(pack, "train")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:images].tolist()
        return DecodedImages.decode(Subset(data, order), 32, CIFAR10_MEAN, CIFAR10_STD, progress=False)
    g = torch.Generator().manual_seed(0)
    return DecodedImages(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.randint(0, 10, (images,), generator=g), 32, CIFAR10_MEAN, CIFAR10_STD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lite0-batch", type=int, default=32)
    parser.add_argument("--cifar-batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="Lite0 training resolutions")
    parser.add_argument("--cifar-widths", type=lambda t: [int(w) for w in t.split("/")], nargs="+",
                        default=[[64, 128, 256], [32, 64, 128]],
                        help="small-encoder widths, e.g. 32/64/128 (hub/train_cifar10.py's recipe)")
    parser.add_argument("--cifar-only", action="store_true", help="only the CIFAR-10 rows")
    parser.add_argument("--cifar-recipe", action="store_true",
                        help="also hub/train_cifar10.py's mask stage as it runs (freeze_embedding, batch 64)")
    parser.add_argument("--random-weights", action="store_true", help="random Lite0 weights (no lite0 extra needed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gpu = args.device.startswith("cuda")
    precisions = [("auto", {})] if gpu else [("auto", {}), ("bf16", {"precision": "bf16"}),
                                             ("fp32", {"precision": "fp32", "channels_last": False})]
    n = max(args.lite0_batch, args.cifar_batch, 64 if args.cifar_recipe else 0) * (args.warmup + args.steps + 1)

    rows = []
    classifier = lite0(args.random_weights)
    for size in args.sizes if not args.cifar_only else []:
        data = tiny_images(n, size)
        for name, options in precisions:
            rate, peak, chosen = measure(classifier, data, args.lite0_batch, args.warmup, args.steps, args.device,
                                 encoder=classifier_features(classifier), embedding_steps=0, **options)
            rows.append((f"EfficientNet-Lite0 explainer, {size} px, {name}{chosen}", args.lite0_batch, rate, peak))
        if size == args.sizes[0]:
            stage = args.warmup + args.steps
            rate, peak, chosen = measure(classifier, data, args.lite0_batch, args.warmup, args.steps, args.device,
                                 encoder=classifier_features(classifier), embedding_steps=stage + 1)
            rows.append((f"EfficientNet-Lite0 explainer, {size} px, embedding stage, auto{chosen}", args.lite0_batch,
                         rate, peak))
    data = cifar_images(n)
    # the settings the rows were measured with, before the small encoder's defaults changed
    earlier = {k: v for k, v in EARLIER_DEFAULTS.items() if k != "mask_reduction"}
    for widths in args.cifar_widths:
        for name, options in precisions:
            rate, peak, chosen = measure(CifarResNet().eval(), data, args.cifar_batch, args.warmup, args.steps, args.device,
                                 encoder="small", encoder_kwargs={"widths": widths}, embedding_steps=0,
                                 mask_reduction=2, **earlier, **options)
            label = "/".join(map(str, widths))
            rows.append((f"CIFAR-10 variant, 32 px, small encoder {label}, ResNet-9 classifier, {name}{chosen}",
                         args.cifar_batch, rate, peak))
    # hub/train_cifar10.py's mask stage as it runs: encoder 32/64/128 and class embedding fixed
    # after the embedding stage (freeze_embedding), so nothing flows back into the encoder; batch 64
    for name, options in precisions if args.cifar_recipe else []:
        rate, peak, chosen = measure(CifarResNet().eval(), data, 64, args.warmup, args.steps, args.device, encoder="small",
                             encoder_kwargs={"widths": [32, 64, 128]}, embedding_steps=0,
                             **{**earlier, "freeze_embedding": True}, mask_reduction=2,
                             objective={"preserve_weight": 1.0}, **options)
        rows.append((f"CIFAR-10 variant as hub/train_cifar10.py trains it (encoder 32/64/128 fixed after the "
                     f"embedding stage), mask stage, {name}{chosen}", 64, rate, peak))

    device = torch.cuda.get_device_name() if gpu else f"{describe_cpu()} CPU, {torch.get_num_threads()} threads"
    def value(v) -> str:  # as typed on the command line
        if isinstance(v, list):
            return " ".join("/".join(map(str, x)) if isinstance(x, list) else str(x) for x in v)
        return str(v)

    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {value(v)}")
                     for k, v in vars(args).items() if v not in (False, None))
    print(f"Command: `python benchmarks/train_throughput.py {flags}`  ")
    print(f"Device: {device}; torch {torch.__version__}; {args.warmup} warm-up steps, then {args.steps} timed; "
          f"date: {date.today()}.\n")
    print("| set-up | batch | training images/s | peak GPU memory (GiB) |")
    print("| --- | --- | --- | --- |")
    for label, batch, rate, peak in rows:
        print(f"| {label} | {batch} | {rate:.1f} | {'' if peak is None else f'{peak:.1f}'} |")


if __name__ == "__main__":
    main()
