"""Is the explainer class-selective? Side by side on two planted-evidence tasks.

    python benchmarks/class_selectivity.py            # about 10 minutes on 2 CPU cores

Tasks (``blackbox_saliency.testing``):

- ``matched filter``: 32 px, 12 px patterns on smooth backgrounds, the hand-built
  ``PatternClassifier``;
- ``learned CNN``: 40 px, 8 px patterns on smooth backgrounds with pixel noise (std 0.15), a
  ``PatternCNN`` trained for 400 steps (a different pattern size, background and classifier).

Each variant trains an explainer with the small encoder (widths 16/32/64), batch 64, for the
given steps on 4,000 images and is scored on 300 others: the share whose mask box (mask > 0.5)
has IoU > 0.5 with the pattern, the share whose mask centroid falls inside it, the mean mask
inside and outside the pattern, and the mean mask for the true class and for an absent one.
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch

from blackbox_saliency import fit_explainer
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns, paired_box_iou, inside_boxes, mask_boxes, train_pattern_cnn
from blackbox_saliency._precision import describe_cpu
from blackbox_saliency.training import EARLIER_DEFAULTS

VARIANTS = {
    "paper's filter (bottleneck only), sampled embedding loss": {"class_filter": "bottleneck", "embedding_loss": "sampled"},
    "filter on every scale, sampled embedding loss": {"class_filter": "all", "embedding_loss": "sampled"},
    "filter on every scale, all-class embedding loss": {"class_filter": "all", "embedding_loss": "all_classes"},
    "filter on every scale, all-class loss, embedding stage first": {"class_filter": "all", "embedding_loss": "all_classes",
                                                                     "embedding_steps": "stage"},
    "paper's filter, all-class loss, embedding stage first": {"class_filter": "bottleneck", "embedding_loss": "all_classes",
                                                              "embedding_steps": "stage"},
    # what the shipped CIFAR-10 and Lite0 recipes add: the embedding stage's work fixed after it,
    # and a heavier preserve term; apart and together
    "filter on every scale, all-class loss, embedding stage first, preserve weight 1": {
        "class_filter": "all", "embedding_loss": "all_classes", "embedding_steps": "stage",
        "objective": {"preserve_weight": 1.0}},
    "filter on every scale, all-class loss, embedding stage first, fixed after it": {
        "class_filter": "all", "embedding_loss": "all_classes", "embedding_steps": "stage", "freeze_embedding": True},
    "filter on every scale, all-class loss, embedding stage first, fixed after it, preserve weight 1": {
        "class_filter": "all", "embedding_loss": "all_classes", "embedding_steps": "stage", "freeze_embedding": True,
        "objective": {"preserve_weight": 1.0}},
    # the embedding stage also trained on each image with the gate's peak cells removed (issue #11)
    "filter on every scale, all-class loss, embedding stage first, fixed after it, removed peak 0.6": {
        "class_filter": "all", "embedding_loss": "all_classes", "embedding_steps": "stage", "freeze_embedding": True,
        "removed_peak_weight": 0.6},
    "filter on every scale, all-class loss, embedding stage first, fixed after it, removed peak 1": {
        "class_filter": "all", "embedding_loss": "all_classes", "embedding_steps": "stage", "freeze_embedding": True,
        "removed_peak_weight": 1.0},
    # leaving out of it the images whose class survives a whole-image blur (docs/fit.md)
    "filter on every scale, all-class loss, embedding stage first, fixed after it, removed peak 1, skip background 0.5": {
        "class_filter": "all", "embedding_loss": "all_classes", "embedding_steps": "stage", "freeze_embedding": True,
        "removed_peak_weight": 1.0, "removed_peak_skip_background": 0.5},
}


def tasks(seed: int):
    train = PlantedPatterns(4000, patch=12, seed=seed)
    yield "matched filter", train, PlantedPatterns(300, patch=12, seed=seed + 1), PatternClassifier(patch=12)
    train = PlantedPatterns(4000, size=40, patch=8, noise=0.15, seed=seed + 10)
    yield ("learned CNN", train, PlantedPatterns(300, size=40, patch=8, noise=0.15, seed=seed + 11),
           train_pattern_cnn(train, steps=400, seed=seed))


def score(explainer, test) -> dict[str, float]:
    with torch.no_grad():
        masks = explainer(test.images, test.labels)
        absent = explainer(test.images, (test.labels + 1) % 4)
    inside = inside_boxes(test.boxes, *masks.shape[-2:])
    h, w = masks.shape[-2:]
    weights = masks[:, 0] / masks[:, 0].sum((1, 2), keepdim=True).clamp_min(1e-8)
    cy = (weights.sum(2) * torch.arange(h)).sum(1)
    cx = (weights.sum(1) * torch.arange(w)).sum(1)
    b = test.boxes.float()
    centroid_in = ((cx >= b[:, 0] - 0.5) & (cx <= b[:, 2] + 0.5) & (cy >= b[:, 1] - 0.5) & (cy <= b[:, 3] + 0.5))
    centroid_in &= masks.flatten(1).sum(1) > 1e-3 * h * w  # an empty mask points nowhere
    return {
        "hit": (paired_box_iou(mask_boxes(masks), test.boxes) > 0.5).float().mean().item(),
        "centroid": centroid_in.float().mean().item(),
        "inside": masks[inside].mean().item(),
        "outside": masks[~inside].mean().item(),
        "true": masks.mean().item(),
        "absent": absent.mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="mask-stage steps per variant")
    parser.add_argument("--embedding-steps", type=int, default=400, help="steps of the embedding stage, where used")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (each draws its own data, "
                        "learned CNN and explainer initialisation)")
    parser.add_argument("--task", default=None, choices=["matched filter", "learned CNN"],
                        help="run only this task")
    parser.add_argument("--only", default=None, help="run only the variants whose name starts with this")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="fit_explainer's precision (auto: bf16 on a CPU with native bf16)")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        parser.error(f"--seeds: expected comma-separated ints ({err})")
    only = f' --only "{args.only}"' if args.only else ""
    only += f' --task "{args.task}"' if args.task else ""
    print(f"Command: `python benchmarks/class_selectivity.py --steps {args.steps} --embedding-steps "
          f"{args.embedding_steps} --precision {args.precision} --seeds {args.seeds}{only}`; machine: {describe_cpu()} CPU, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; date: {date.today()}\n")
    print("| task | seed | variant | hit rate (IoU > 0.5) | centroid in pattern | mask inside / outside | "
          "mean mask, true class | mean mask, absent class | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed, (task, train, test, classifier) in ((seed, t) for seed in seeds for t in tasks(seed)):
        if args.task and task != args.task:
            continue
        for name, options in VARIANTS.items():
            if args.only and not name.startswith(args.only):
                continue
            options = {**EARLIER_DEFAULTS, **options}  # the defaults these rows were measured with
            stage = args.embedding_steps if options.get("embedding_steps") == "stage" else 0
            options["embedding_steps"] = stage
            start = time.time()
            explainer = fit_explainer(classifier, train, encoder="small", encoder_kwargs={"widths": [16, 32, 64]},
                                      epochs=1000, max_steps=args.steps + stage, seed=seed, progress=False,
                                      precision=args.precision, **options)
            seconds = time.time() - start
            r = score(explainer, test)
            print(f"| {task} | {seed} | {name} | {r['hit']:.2f} | {r['centroid']:.2f} | {r['inside']:.2f} / {r['outside']:.2f} | "
                  f"{r['true']:.3f} | {r['absent']:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
