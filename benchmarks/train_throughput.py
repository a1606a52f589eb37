"""Training images per second of ``fit_explainer`` with each recipe, end to end from the data packs.

    python benchmarks/train_throughput.py                    # the CPU here, about 10 minutes
    python benchmarks/train_throughput.py --device cuda      # a GPU (adds peak memory)

Rows, each the library's own training step fed the library's own way (images decoded once into
memory as uint8 by ``DecodedImages``, no loader):

- recipe ``"timm"``: the EfficientNet-Lite0 black box (random weights if the ``lite0`` extra is
  missing; speed does not depend on them), its mask stage at each of ``--sizes`` (Tiny ImageNet
  train pack a, resized), in the batches of ``--lite0-batch`` split into passes as the recipe's
  ``runtime.max_pixels_per_pass`` says;
- recipes ``"cifar"`` (its embedding stage and its mask stage) and ``"small"`` (its mask stage)
  against a ResNet-9 on CIFAR-10 train images at 32 px.

Each on the CPU in precision ``auto`` (each part under bf16 autocast where timing it found that
faster; the row names the choice), ``bf16`` and ``fp32``. The rate is read from the training
log: images/s over the steps after the first ``--warmup``, timed by the training loop itself.
"""

from __future__ import annotations

import argparse
import logging
from datetime import date
from pathlib import Path

import timm
import torch
from torch.utils.data import Subset

from blackbox_saliency import Recipe, fit_explainer, get_recipe
from blackbox_saliency.classifiers import CIFAR10_MEAN, CIFAR10_STD, CifarResNet
from blackbox_saliency.datasets import DecodedImages, TinyImageNet, cifar10
from blackbox_saliency._precision import describe_cpu

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class _Rates(logging.Handler):
    """Collects the images/s of the training loop's progress lines."""

    def __init__(self):
        super().__init__()
        self.rates: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("step ") and record.args:
            self.rates.append(float(record.args[-1]))


def measure(classifier, data, recipe: Recipe, stage: str, warmup: int, steps: int,
            device: str) -> tuple[float, float | None, str]:
    """Images per second of ``recipe``'s ``stage`` (``"embedding"`` or ``"masks"``, its last one
    of that kind, alone) after ``warmup`` steps (``steps`` more), peak GPU memory (GiB), and what
    ran under bf16 when ``precision="auto"`` timed the parts (else "")."""
    if warmup and steps % warmup:
        raise ValueError("--steps must be a multiple of --warmup")
    spec = [s for s in recipe.schedule.stages if (type(s).__name__ == "EmbeddingStage") == (stage == "embedding")][-1]
    if stage == "embedding":  # one embedding stage, then a last step of masks (a schedule needs one)
        total = warmup + steps + 1
        stages = [{**spec.__dict__, "kind": "embedding", "share": (total - 1) / total},
                  {"kind": "masks", "share": 1 / total}]
    else:
        stages = [{**spec.__dict__, "kind": "masks", "share": 1.0}]
    recipe = recipe.replace(**{"schedule.stages": stages, "runtime.log_every": steps if warmup == 0 else warmup,
                               "runtime.checkpoint_every": None})
    handler = _Rates()
    log = logging.getLogger("blackbox_saliency.training")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        explainer = fit_explainer(classifier, data, recipe, steps=warmup + steps, device=device, seed=0, progress=False)
    finally:
        log.removeHandler(handler)
    measured = handler.rates[1:] if warmup else handler.rates
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    parts = explainer.config.training.get("precision_parts")
    chosen = " (" + ", ".join(f"{part.replace('_', ' ')} {value}" for part, value in parts.items()) + ")" \
        if parts and recipe.runtime.precision == "auto" else ""
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
    parser.add_argument("--cifar-batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224], help="Lite0 training resolutions")
    parser.add_argument("--cifar-widths", type=lambda t: [int(w) for w in t.split("/")], default=None,
                        help="small-encoder widths for both CIFAR recipes, e.g. 8/16/32 (default: each recipe's)")
    parser.add_argument("--cifar-only", action="store_true", help="only the CIFAR-10 rows")
    parser.add_argument("--random-weights", action="store_true", help="random Lite0 weights (no lite0 extra needed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gpu = args.device.startswith("cuda")
    precisions = ["auto"] if gpu else ["auto", "bf16", "fp32"]
    n = max(args.lite0_batch, args.cifar_batch) * (args.warmup + args.steps + 2)

    rows = []
    classifier = lite0(args.random_weights)
    for size in args.sizes if not args.cifar_only else []:
        data = tiny_images(n, size)
        for precision in precisions:
            recipe = get_recipe("timm").replace(**{"runtime.precision": precision,
                                                   "schedule.batch_size": args.lite0_batch})
            rate, peak, chosen = measure(classifier, data, recipe, "masks", args.warmup, args.steps, args.device)
            rows.append((f"timm: EfficientNet-Lite0, mask stage, {size} px, {precision}{chosen}", args.lite0_batch,
                         rate, peak))
    data = cifar_images(n)
    for name, stage in (("cifar", "embedding"), ("cifar", "masks"), ("small", "masks")):
        for precision in precisions:
            recipe = get_recipe(name).replace(**{"runtime.precision": precision, "schedule.batch_size": args.cifar_batch})
            if args.cifar_widths:
                recipe = recipe.replace(**{"model.encoder_kwargs": {"widths": args.cifar_widths}})
            widths = "/".join(map(str, recipe.model.encoder_kwargs.get("widths", [64, 128, 256])))
            rate, peak, chosen = measure(CifarResNet().eval(), data, recipe, stage, args.warmup, args.steps, args.device)
            rows.append((f"{name}: CIFAR-10 ResNet-9, {stage} stage, small encoder {widths}, 32 px, {precision}{chosen}",
                         args.cifar_batch, rate, peak))

    device = torch.cuda.get_device_name() if gpu else f"{describe_cpu()} CPU, {torch.get_num_threads()} threads"
    def value(name: str, v) -> str:  # as typed on the command line
        if isinstance(v, list):
            return ("/" if name == "cifar_widths" else " ").join(map(str, v))
        return str(v)

    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {value(k, v)}")
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
