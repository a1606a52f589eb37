"""Each part of a training step timed in float32 and bf16 autocast, default and channels-last layout.

    python benchmarks/precision_parts.py --setup lite0 --size 128     # the CPU here, a few minutes
    python benchmarks/precision_parts.py --setup cifar

``fit_explainer`` runs a step's two heavy parts under one precision: the masking model
(forward, and backward into its trainable weights) and the black box (forward on the masked
images, backward to those images). Whether bf16 autocast pays differs by part, network and
resolution on a CPU, so this times each part alone, per image, in the four combinations (the
passes ``precision="auto"`` times, from ``blackbox_saliency._precision``, plus the embedding
stage's pass: encoder and class filter only):

- ``lite0``: the EfficientNet-Lite0 black box (random weights if the ``lite0`` extra is missing;
  speed does not depend on them) and the Lite0 explainer (the same network's frozen feature
  pyramid as encoder), at ``--size``;
- ``cifar``: the CIFAR-10 ResNet-9 (width 64) and the CIFAR variant's small random-init encoder
  (widths 32/64/128, hub/train_cifar10.py's recipe, trained) with the mask at 1/2, at 32 px.

Inputs are random pixels: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch

from blackbox_saliency import Explainer
from blackbox_saliency._precision import classifier_pass, describe_cpu, embedding_pass, masking_pass
from blackbox_saliency.allocator import keep_freed_memory
from blackbox_saliency.classifiers import CifarResNet
from blackbox_saliency.encoders import classifier_features

COMBINATIONS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def seconds_per_pass(step, repeats: int) -> float:
    step()  # warm-up: allocation and oneDNN's first-call kernel choice are not what a run pays per step
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def set_up_timing(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...]) -> None:
    """For the timing scripts: the ``positive`` options at least 1 when given (a clear error naming
    each), ``--threads``, freed memory kept in the heap as ``fit_explainer`` does, a fixed seed."""
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: must be at least 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as fit_explainer does on the CPU
    torch.manual_seed(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=["lite0", "cifar"], default="lite0")
    parser.add_argument("--size", type=int, default=128, help="Lite0's resolution (the CIFAR set-up is 32 px)")
    parser.add_argument("--batch", type=int, default=None, help="images per pass (default: 32 Lite0, 64 CIFAR)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes after 2 warm-up passes")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_up_timing(parser, args, ("size", "repeats", "threads", "batch"))
    if args.setup == "lite0":
        import timm

        try:
            from blackbox_saliency import load_classifier

            classifier = load_classifier("efficientnet_lite0")[0]
        except ImportError:
            classifier = timm.create_model("efficientnet_lite0", pretrained=False).eval()
        size, batch, classes = args.size, args.batch or 32, 1000
        explainer = Explainer(classes, classifier_features(classifier))
    else:
        classifier = CifarResNet().eval()
        size, batch, classes = 32, args.batch or 64, 10
        explainer = Explainer(classes, "small", encoder_kwargs={"widths": [32, 64, 128]}, mask_reduction=2)
    for p in classifier.parameters():
        p.requires_grad_(False)
    explainer.train()
    images = torch.randn(batch, 3, size, size)
    class_ids = torch.randint(0, classes, (batch,))

    rows = []
    for precision, channels_last in COMBINATIONS:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        classifier.to(memory_format=layout)
        explainer.to(memory_format=layout)
        x = images.contiguous(memory_format=layout)
        bf16 = precision == "bf16"
        for part, step in (("black box", classifier_pass(classifier, x, bf16)),
                           ("masking model", masking_pass(explainer.masking_model, x, class_ids, bf16)),
                           ("embedding stage", embedding_pass(explainer.masking_model, x, bf16))):
            rows.append((part, precision, "channels-last" if channels_last else "default", batch / seconds_per_pass(step, args.repeats)))

    setup = f"EfficientNet-Lite0, {size} px" if args.setup == "lite0" else "CIFAR-10 ResNet-9 and small encoder, 32 px"
    print(f"{setup}, batch {batch}; {describe_cpu()} CPU, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; {args.repeats} timed passes after 2 warm-up; date: {date.today()}\n")
    print("| part | precision | layout | images/s (forward + backward) |")
    print("| --- | --- | --- | --- |")
    for part, precision, layout, rate in sorted(rows, key=lambda r: r[0]):  # parts grouped
        print(f"| {part} | {precision} | {layout} | {rate:.1f} |")


if __name__ == "__main__":
    main()
