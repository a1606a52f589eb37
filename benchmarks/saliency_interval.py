"""How sure a saliency-metric comparison is: per-image scores and a paired bootstrap interval.

    python benchmarks/saliency_interval.py --classifier cifar10 --data cifar10-test \
        --pack ../shared/data/cifar10-jpeg.tar.gz --limit 10000 \
        --explainer blackbox_saliency/weights/explainer-cifar10 --explainer OTHER_FOLDER

The saliency metric is a mean of ``log(max(a, 0.05)) - log(p)`` over images, and ``-log p`` has a
long tail (one image with p = 1e-4 adds 9.2 / N), so two methods a few thousandths apart on 500
images may not differ at all. For the same images as ``benchmarks/evaluate.py`` (same seed and
order), this scores the max box, the centre box and each ``--explainer`` per image, then gives
each method's mean with a 95% bootstrap interval, and its mean difference from the centre box,
the max box and each ``--baseline`` (e.g. ``--baseline Grad-CAM``, a prefix of a name in
``blackbox_saliency.baselines.BASELINES``) with a 95% paired bootstrap interval (the same
resampled images for both).
Also the mean mask for the true class and for a random absent one (as in ``evaluate.py``).
Where the data has boxes (``tiny-val``, ``imagenet-val``), a further table does the same for
localisation: each method's error (the paper's protocol, ``metrics.localisation_error``) with a
95% interval, and its paired difference in hits from each reference (positive: more hits).

    python benchmarks/saliency_interval.py --data imagenet-val --pack ../shared/data/imagenet-val-boxes.tar.gz \
        --limit 666 --explainer blackbox_saliency/weights/explainer-efficientnet_lite0 --baseline Grad-CAM

A mask with no pixel above 0.5 scores as the whole image (its box is the image), so an explainer
can beat the centre box overall by leaving empty exactly the images whose object is off centre.
A second table splits each explainer's images into those two kinds and compares it with the
centre box on each, paired.
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

from blackbox_saliency import Explainer, explain, load_classifier  # noqa: E402
from blackbox_saliency.baselines import BASELINES  # noqa: E402
from blackbox_saliency.metrics import localisation_error, saliency_metric  # noqa: E402
from blackbox_saliency._precision import describe_cpu  # noqa: E402


def bootstrap_interval(values: torch.Tensor, resamples: int, generator: torch.Generator) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` (or of paired differences)."""
    picks = torch.randint(len(values), (resamples, len(values)), generator=generator)
    means = values[picks].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def empty_split(method: torch.Tensor, centre: torch.Tensor, is_empty: torch.Tensor, resamples: int,
                generator: torch.Generator) -> list[str]:
    """Table cells: the share of empty masks, then the method's paired difference from the centre
    box on the images whose mask is not empty, and on those whose mask is (there the method's
    score is the whole image's)."""
    cells = [f"{is_empty.float().mean():.3f}"]
    for rows in (~is_empty, is_empty):
        if not rows.any():
            cells.append("no images")
            continue
        difference = method[rows] - centre[rows]
        low, high = bootstrap_interval(difference, resamples, generator)
        cells.append(f"{difference.mean():+.3f} ({low:+.3f} to {high:+.3f}), {int(rows.sum())} images")
    return cells


def reference_methods(prefixes: list[str]) -> list[str]:
    """The centre box, the max box, then the baseline each prefix names (exactly one each)."""
    references = ["centre box", "max box"]
    for prefix in prefixes:
        found = [name for name in BASELINES if name.startswith(prefix)]
        if len(found) != 1:
            raise ValueError(f"--baseline: {prefix!r} matches {found or 'none'} of {list(BASELINES)}; give one")
        references += [name for name in found if name not in references]
    return references


def masks_for(model, explainer, images, labels, batch_size):
    return torch.cat([explain(model, images[i : i + batch_size], labels[i : i + batch_size], explainer=explainer).float()
                      for i in range(0, len(images), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="efficientnet_lite0")
    parser.add_argument("--data", choices=["tiny-val", "imagenet-val", "imagenet-samples", "cifar10-test"],
                        required=True)
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--explainer", action="append", default=[], help="folder or Hub repo id; repeat for several")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline", action="append", default=[],
                        help="another baseline to score and compare with (a name prefix, e.g. Grad-CAM); repeatable")
    args = parser.parse_args()
    check_explainer_args(parser, args, ("limit", "batch_size", "resamples"))
    try:
        references = reference_methods(args.baseline)
    except ValueError as err:
        parser.error(str(err))

    model, preprocess = load_classifier(args.classifier)
    images, labels, boxes = load_data(args, model, preprocess)
    k = model(images[:1]).shape[1]
    absent = (labels + torch.randint(1, k, labels.shape, generator=torch.Generator().manual_seed(args.seed + 1))) % k

    scores, areas, empty, hits = {}, {}, {}, {}
    for name in references:
        masks = torch.cat([BASELINES[name](model, images[i : i + args.batch_size], labels[i : i + args.batch_size])
                           for i in range(0, len(images), args.batch_size)])
        scores[name] = saliency_metric(model, images, masks, labels)
        if boxes is not None:
            hits[name] = localisation_error(masks, boxes, return_hits=True)[1].float()
    for folder in args.explainer:
        explainer = Explainer.from_pretrained(folder)
        masks = masks_for(model, explainer, images, labels, args.batch_size)
        scores[folder] = saliency_metric(model, images, masks, labels)
        if boxes is not None:
            hits[folder] = localisation_error(masks, boxes, return_hits=True)[1].float()
        empty[folder] = masks.flatten(1).amax(1) <= 0.5  # as tightest_box: nothing above the threshold
        areas[folder] = (masks.mean().item(), masks_for(model, explainer, images, absent, args.batch_size).mean().item())

    generator = torch.Generator().manual_seed(args.seed + 2)
    lines = [
        f"Classifier `{args.classifier}` on {len(images)} images of `{args.data}`; {args.resamples} bootstrap resamples.",
        "",
        f"Command: `python benchmarks/saliency_interval.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
        f"date: {date.today()}.",
        "",
        "| method | saliency metric (95% interval) | "
        + "".join(f"minus {name} (95% paired interval) | " for name in references)
        + "mean mask, true class | mean mask, absent class |",
        "| --- | --- | " + "--- | " * len(references) + "--- | --- |",
    ]
    for name, values in scores.items():
        low, high = bootstrap_interval(values, args.resamples, generator)
        cells = [f"{values.mean():.3f} ({low:.3f} to {high:.3f})"]
        for reference in references:
            difference = values - scores[reference]
            d_low, d_high = bootstrap_interval(difference, args.resamples, generator)
            cells.append(f"{difference.mean():+.3f} ({d_low:+.3f} to {d_high:+.3f})" if name != reference else "")
        true_area, absent_area = areas.get(name, (None, None))
        cells += [f"{true_area:.3f}" if true_area is not None else "", f"{absent_area:.3f}" if absent_area is not None else ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| method | true-class masks empty | on the others: method minus centre box (95% paired interval) | "
              "on the empty ones: max box minus centre box (95% paired interval) |", "| --- | --- | --- | --- |"]
    for name, is_empty in empty.items():
        cells = empty_split(scores[name], scores["centre box"], is_empty, args.resamples, generator)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if hits:
        lines += ["", "| method | localisation error, % (95% interval) | "
                  + "".join(f"hits minus {name}'s, % of images (95% paired interval) | " for name in references).rstrip(),
                  ("| --- | --- | " + "--- | " * len(references)).rstrip()]
        for name, values in hits.items():
            low, high = bootstrap_interval(values, args.resamples, generator)
            cells = [f"{100 * (1 - values.mean()):.1f} ({100 * (1 - high):.1f} to {100 * (1 - low):.1f})"]
            for reference in references:
                difference = values - hits[reference]
                d_low, d_high = bootstrap_interval(difference, args.resamples, generator)
                cells.append(f"{100 * difference.mean():+.1f} ({100 * d_low:+.1f} to {100 * d_high:+.1f})"
                             if name != reference else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
