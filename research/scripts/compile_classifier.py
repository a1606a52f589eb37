"""Does ``torch.compile`` speed up the CIFAR-10 ResNet-9's training pass on the CPU?

    python benchmarks/compile_classifier.py --threads 2

Times the black box's part of a training step (forward, and backward to the input images, as the
preserve and destroy terms need: ``blackbox_saliency._precision.classifier_pass``) for the
CIFAR-10 ResNet-9 (width 64, random weights: speed does not depend on them) on a batch of 128
random 32 px images, eager and under ``torch.compile`` (default mode), in float32 and bf16
autocast, default and channels-last layout. Two warm-up passes, then ``--repeats`` timed ones;
the compiled rows also give the first call's time (the compilation).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_parts import seconds_per_pass, set_up_timing  # noqa: E402  (same warm-up and timing)

from blackbox_saliency._precision import classifier_pass, describe_cpu  # noqa: E402
from blackbox_saliency.classifiers import CifarResNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    set_up_timing(parser, args, ("threads", "batch", "repeats"))
    net = CifarResNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    images = torch.randn(args.batch, 3, 32, 32)
    print(f"Command: `python benchmarks/compile_classifier.py --threads {torch.get_num_threads()} --batch {args.batch} "
          f"--repeats {args.repeats}`; machine: {describe_cpu()} CPU, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; date: {date.today()}\n")
    print("| layout | precision | eager images/s | compiled images/s | first compiled call (s) |")
    print("| --- | --- | --- | --- | --- |")
    for channels_last in (False, True):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        net.to(memory_format=layout)
        x = images.contiguous(memory_format=layout)
        for bf16 in (False, True):
            eager = args.batch / seconds_per_pass(classifier_pass(net, x, bf16), args.repeats)
            torch._dynamo.reset()
            compiled = torch.compile(net)
            start = time.perf_counter()
            classifier_pass(compiled, x, bf16)()
            first = time.perf_counter() - start
            fast = args.batch / seconds_per_pass(classifier_pass(compiled, x, bf16), args.repeats)
            print(f"| {'channels-last' if channels_last else 'default'} | {'bf16' if bf16 else 'fp32'} | {eager:.1f} | "
                  f"{fast:.1f} | {first:.0f} |", flush=True)


if __name__ == "__main__":
    main()
