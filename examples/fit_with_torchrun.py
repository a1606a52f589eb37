"""Train an explainer on several processes with torchrun; the very same script runs on one.

    torchrun --standalone --nproc_per_node=2 examples/fit_with_torchrun.py    # 2 processes
    python examples/fit_with_torchrun.py                                       # 1 process

On GPUs each process takes one (NCCL); on a CPU-only machine the processes share the CPU
(gloo). ``fit_explainer`` joins the process group torchrun describes, gives each process
``schedule.batch_size / N`` images of every batch and synchronises gradients and batch norm, so both
commands train the same explainer up to float noise (``tests/test_distributed.py`` checks it).
To see it, train in float64 with the classifier's smooth pool and compare the two folders:

    python examples/fit_with_torchrun.py --float64 --smooth-pool 50 --steps 4 --embedding-steps 1 --out one
    torchrun --standalone --nproc_per_node=2 examples/fit_with_torchrun.py --float64 --smooth-pool 50 \
        --steps 4 --embedding-steps 1 --out two --compare-to one

The problem is the planted-pattern task (``blackbox_saliency.testing``): a classifier that only
sees a small pattern pasted into noise, so a good mask covers the pattern. For your own data,
swap in your classifier and dataset; see docs/distributed.md for ImageNet-sized runs.
"""

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from blackbox_saliency import Recipe, fit_explainer, get_recipe
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns, paired_box_iou, mask_boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps in all")
    parser.add_argument("--embedding-steps", type=int, default=150, help="of which the embedding stage (fit_explainer)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across processes")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64], help="the small encoder's widths")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when there is a GPU, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100, help="log losses and images/s every N steps (process 0)")
    parser.add_argument("--out", type=Path, default=Path("explainer-torchrun"))
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="resume from here, with any number of processes")
    parser.add_argument("--removed-peak-weight", type=float, default=None,
                        help="the embedding stage's removed_peak_weight (default: the small recipe's, 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the recipe (JSON value), e.g. --set objective.area_weight=12; "
                             "repeatable")
    parser.add_argument("--float64", action="store_true",
                        help="train in float64: with --smooth-pool, 1 and N processes then agree to about 1e-11 (in "
                             "float32 they agree up to float noise, which training amplifies)")
    parser.add_argument("--smooth-pool", type=float, default=None, metavar="T",
                        help="the matched filter pools with logsumexp(T * response) / T instead of the maximum, whose "
                             "gradient jumps when rounding moves the maximum (see PatternClassifier)")
    parser.add_argument("--compare-to", type=Path, default=None, metavar="DIR",
                        help="print the largest relative weight difference to the explainer saved in DIR")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.float64:
        torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    train, test = PlantedPatterns(args.train_images, patch=12, seed=0), PlantedPatterns(200, patch=12, seed=1)
    explainer = fit_explainer(
        PatternClassifier(patch=12, smooth=args.smooth_pool), train, recipe(args), steps=args.steps,
        device=args.device, seed=args.seed, checkpoint_dir=args.checkpoint_dir, resume=args.checkpoint_dir is not None,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # every process holds the same explainer; one writes it
        explainer.save_pretrained(args.out)
        with torch.no_grad():
            masks = explainer(test.images, test.labels)
        hits = (paired_box_iou(mask_boxes(masks), test.boxes) > 0.5).float().mean().item()
        print(f"{int(os.environ.get('WORLD_SIZE', '1'))} process(es), {args.steps} steps: the mask covers the "
              f"planted pattern in {hits:.0%} of held-out images; saved to {args.out}")
        if args.compare_to is not None:
            print(f"largest relative weight difference to {args.compare_to}: "
                  f"{worst_difference(args.out, args.compare_to):.3g}")


def recipe(args: argparse.Namespace) -> Recipe:
    """The small recipe with this script's settings: ``--embedding-steps`` of the ``--steps`` in the
    embedding stage (a stage's share of the run), then each ``--set``."""
    if not 0 <= args.embedding_steps <= args.steps:
        raise SystemExit(f"--embedding-steps: must be in [0, --steps], got {args.embedding_steps}")
    small = get_recipe("small")
    embedding, masks = small.schedule.stages
    share = args.embedding_steps / args.steps
    if args.removed_peak_weight is not None:
        embedding = dataclasses.replace(embedding, removed_peak_weight=args.removed_peak_weight)
    stages = [dataclasses.replace(embedding, share=share), dataclasses.replace(masks, share=1 - share)]
    changes = {"model.encoder_kwargs": {"widths": args.widths}, "schedule.stages": stages,
               "schedule.batch_size": args.batch_size, "runtime.log_every": args.log_every,
               "runtime.checkpoint_every": 50}
    if args.float64:  # a bf16 autocast would undo it
        changes["runtime.precision"] = "fp32"
    for pair in args.overrides:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: expected KEY=VALUE")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return small.replace(**changes)


def worst_difference(a: Path, b: Path) -> float:
    """The largest difference between two saved explainers' tensors, relative to each tensor's
    largest magnitude (at least 1e-6, so that tensors near zero do not dominate)."""
    one, two = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if one.keys() != two.keys():
        raise ValueError(f"--compare-to: {b} holds other tensors than {a}")
    return max(((one[k].double() - two[k].double()).abs().max() / one[k].double().abs().max().clamp_min(1e-6)).item()
               for k in one)


if __name__ == "__main__":
    main()
