"""Where an explainer's localisation errors come from: split by empty masks, by whether the
classifier names the label, and by whether the explainer's class embedding does.

    python benchmarks/localisation_breakdown.py --pack ../shared/data/tiny-imagenet-200-val.tar.gz \
        --limit 500 --explainer blackbox_saliency/weights/explainer-efficientnet_lite0

The same Tiny ImageNet validation images, in the same order, as ``benchmarks/evaluate.py
--data tiny-val`` (64 px resized to the classifier's size). For each ``--explainer`` it gives
the localisation error of its true-class masks beside the centre box's on the same images, for
all images and for groups of them: masks that are empty (no pixel above 0.5, so the box is the
whole image) or not; images the classifier classifies correctly or not; images whose label the
explainer's presence scores (``max_ij X_ij^T C_k`` of its feature filter) rank first or not.
Also the classifier's top-1, the presence ranking's agreement with the label and with the
classifier's prediction, and the mean area of the mask's box against the ground truth's.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import check_explainer_args, load_data  # noqa: E402  (same images, same order)

from blackbox_saliency import Explainer, load_classifier  # noqa: E402
from blackbox_saliency.baselines import centre_box  # noqa: E402
from blackbox_saliency.metrics import localisation_error, tightest_box  # noqa: E402
from blackbox_saliency._precision import describe_cpu  # noqa: E402


def group_rows(hits: torch.Tensor, centre_hits: torch.Tensor,
               groups: dict[str, torch.Tensor]) -> list[tuple[str, int, float | None, float | None]]:
    """``(group, images, error, centre box's error)`` for each boolean row selection in
    ``groups``; the errors are ``None`` for a group with no images."""
    rows = []
    for name, selected in groups.items():
        n = int(selected.sum())
        if not n:
            rows.append((name, 0, None, None))
            continue
        rows.append((name, n, 1 - hits[selected].float().mean().item(), 1 - centre_hits[selected].float().mean().item()))
    return rows


def box_area(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Share of the image covered by each ``(x0, y0, x1, y1)`` box."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (size[0] * size[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="efficientnet_lite0")
    parser.add_argument("--pack", type=Path, required=True, help="the Tiny ImageNet val pack")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--explainer", action="append", default=[], help="folder or Hub repo id; repeat for several")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    check_explainer_args(parser, args, ("limit", "batch_size"))
    args.data = "tiny-val"

    model, preprocess = load_classifier(args.classifier)
    images, labels, boxes = load_data(args, model, preprocess)
    size = tuple(images.shape[-2:])
    batches = range(0, len(images), args.batch_size)
    with torch.no_grad():
        predicted = torch.cat([model(images[i : i + args.batch_size]).argmax(1) for i in batches])
        centre = centre_box(model, images)
    right = predicted == labels
    centre_hits = localisation_error(centre, boxes, return_hits=True)[1]
    gt_area = torch.stack([box_area(b.reshape(-1, 4), size).max() for b in boxes])

    lines = [
        f"Classifier `{args.classifier}` on {len(images)} Tiny ImageNet val images at {size[0]} px (its top-1 on "
        f"them: {right.float().mean():.3f}); ground-truth box area {gt_area.mean():.3f} of the image on average.",
        "",
        f"Command: `python benchmarks/localisation_breakdown.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
        f"date: {date.today()}.",
    ]
    for folder in args.explainer:
        explainer = Explainer.from_pretrained(folder).eval()
        with torch.no_grad():
            masks = torch.cat([explainer(images[i : i + args.batch_size], labels[i : i + args.batch_size]).float()
                               for i in batches])
            presence = torch.cat([explainer.masking_model.presence(images[i : i + args.batch_size]).argmax(1)
                                  for i in batches])
        hits = localisation_error(masks, boxes, return_hits=True)[1]
        empty = masks.flatten(1).amax(1) <= 0.5  # as tightest_box: nothing above the threshold
        ranked = presence == labels
        area = box_area(tightest_box(masks, 0.5), size)
        lines += [
            "",
            f"`{folder}`: presence scores rank the label first for {ranked.float().mean():.3f} of the images and the "
            f"classifier's prediction first for {(presence == predicted).float().mean():.3f}; true-class masks empty "
            f"for {empty.float().mean():.3f} (where the classifier is right: "
            f"{empty[right].float().mean() if right.any() else float('nan'):.3f}, wrong: "
            f"{empty[~right].float().mean() if (~right).any() else float('nan'):.3f}); the box of a mask that is not "
            f"empty covers {area[~empty].mean() if (~empty).any() else float('nan'):.3f} of the image on average.",
            "",
            "| images | count | localisation error | centre box's |",
            "| --- | --- | --- | --- |",
        ]
        groups = {"all": torch.ones_like(empty), "mask not empty": ~empty, "mask empty": empty,
                  "classifier right": right, "classifier wrong": ~right,
                  "label ranked first by presence": ranked, "label not ranked first": ~ranked}
        for name, n, error, centre_error in group_rows(hits, centre_hits, groups):
            cells = ("", "") if error is None else (f"{100 * error:.1f}%", f"{100 * centre_error:.1f}%")
            lines.append(f"| {name} | {n} | {cells[0]} | {cells[1]} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
