"""How far each inference option moves the masks from float32 (the table in docs/speed.md).

    python benchmarks/inference_options.py            # add --compile to include torch.compile

A small random-init explainer (the tests' size: small encoder, widths 8/16/32), one batch in
train mode for realistic BatchNorm statistics, then the largest absolute difference between
its float32 masks and those of each ``for_inference`` option on ``--images`` random 32 px
images. Bounds the tests assert are in ``tests/test_inference_options.py``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from datetime import date

import torch

from blackbox_saliency import Explainer
from blackbox_saliency._precision import describe_cpu

OPTIONS = {
    "`channels_last=True`": {"channels_last": True},
    "`dtype=torch.float16`": {"dtype": torch.float16},
    "`dtype=torch.bfloat16`": {"dtype": torch.bfloat16},
    "`compile=True`": {"compile": True},
}


def max_difference(reference: Explainer, options: dict, images: torch.Tensor, ids: torch.Tensor) -> float:
    configured = copy.deepcopy(reference).for_inference(**options)
    with torch.no_grad():
        return (reference(images, ids) - configured(images, ids)).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to build)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images: must be at least 1, got {args.images}")
    torch.manual_seed(0)
    explainer = Explainer(num_classes=4, encoder="small", encoder_kwargs={"widths": [8, 16, 32], "layers_per_block": 2})
    explainer.train()(torch.randn(16, 3, 32, 32), 0)
    explainer = explainer.eval().to(args.device)
    images = torch.randn(args.images, 3, 32, 32, device=args.device)
    ids = torch.arange(args.images, device=args.device) % 4
    lines = [f"Command: `python benchmarks/inference_options.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: {describe_cpu()} {args.device}, torch {torch.__version__}; date: {date.today()}.", "",
             "| option | max abs difference from float32 |", "| --- | --- |"]
    for name, options in OPTIONS.items():
        if "compile" in options and not args.compile:
            continue
        lines.append(f"| {name} | {max_difference(explainer, options, images, ids):.1e} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
