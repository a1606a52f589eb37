"""Which objective settings give masks that mean something? Measured on the planted-evidence
task (blackbox_saliency.testing): 32 px images with a 12 px pattern at a random place, a
hand-built classifier that sees only the pattern, an explainer with the small encoder.

Run: python benchmarks/planted_objective.py  (about 5 minutes on 2 CPU cores)
Prints a markdown table: share of test images whose mask box (mask > 0.5) has IoU > 0.5 with
the planted patch, and the mean mask for the true class and for an absent class.
"""

from __future__ import annotations

import argparse
import time

import torch

from blackbox_saliency import SaliencyObjective, fit_explainer
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns, paired_box_iou, mask_boxes
from blackbox_saliency._precision import describe_cpu
from blackbox_saliency.training import EARLIER_DEFAULTS

VARIANTS = {
    "default (hinge, area 8*mean((M+5e-4)^0.3), TV 10)": ({}, {}),
    "paper's probability terms, default area": ({"classifier_loss": "probability", "preserve_weight": 1.0, "destroy_weight": 5.0}, {}),
    "paper literally (SaliencyObjective.paper())": ("paper", {}),
    "default, no embedding speed-up (presence_weight=0)": ({}, {"presence_weight": 0.0}),
    "default, no fake labels (fake_label_prob=0)": ({}, {"fake_label_prob": 0.0}),
    "hinge, linear area (power 1) 2": ({"area_power": 1.0, "area_eps": 0.0, "area_weight": 2.0}, {}),
    "hinge, linear area (power 1) 5": ({"area_power": 1.0, "area_eps": 0.0, "area_weight": 5.0}, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4000, help="training images")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast there)")
    parser.add_argument("--only", default=None, help="run only the variants whose name starts with this")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train, test = PlantedPatterns(args.train, patch=12, seed=args.seed), PlantedPatterns(300, patch=12, seed=args.seed + 1)
    classifier = PatternClassifier(patch=12)
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"machine: {describe_cpu()} {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}; "
          f"{args.train} training images, {args.steps} steps of batch 64, 300 test images\n")
    print("| objective | hit rate (IoU > 0.5) | mean mask, true class | mean mask, absent class | train s |")
    print("| --- | --- | --- | --- | --- |")
    for name, (objective, extra) in VARIANTS.items():
        if args.only and not name.startswith(args.only):
            continue
        objective = SaliencyObjective.paper() if objective == "paper" else SaliencyObjective(**objective)
        start = time.time()
        explainer = fit_explainer(classifier, train, encoder="small", encoder_kwargs={"widths": [16, 32, 64]},
                                  epochs=100, max_steps=args.steps, objective=objective, seed=args.seed,
                                  progress=False, device=args.device,
                                  **{**EARLIER_DEFAULTS, **extra})  # the defaults these rows were measured with
        seconds = time.time() - start
        with torch.no_grad():
            images, labels = test.images.to(args.device), test.labels.to(args.device)
            masks = explainer(images, labels).cpu()
            absent = explainer(images, (labels + 1) % 4).cpu()
        hits = (paired_box_iou(mask_boxes(masks), test.boxes) > 0.5).float().mean().item()
        print(f"| {name} | {hits:.2f} | {masks.mean().item():.3f} | {absent.mean().item():.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
