"""A library user's own timm classifier gets an explainer: fit_explainer on Imagenette, scored on held-out photographs.

    # once: fetch and extract the data (see benchmarks/imagenette.py), then
    nice -n 19 python benchmarks/fit_user_classifier.py --baselines-only   # minutes: no training
    nice -n 19 python benchmarks/fit_user_classifier.py                    # trains with the library's defaults

The classifier is what a user would bring: timm's ``efficientnet_lite0`` with ImageNet weights
(``load_classifier("efficientnet_lite0")``) and a new 10-class linear head fitted on Imagenette
(``imagenette.imagenette_classifier``). The explainer comes from the library's public entry
called as a user would, with nothing but the classifier and a dataset:
``fit_explainer(classifier, dataset)``, the dataset a ``DecodedImages`` of the 12,894 training
images (uint8 in memory, normalised with the classifier's mean/std a batch at a time). Its wall
time and the process's peak resident memory (``ru_maxrss``, which includes the ~2 GB of decoded
images) are recorded. Then the explainer, the centre box, the whole image and Grad-CAM are
scored on the 500 held-out ImageNet validation photographs with their true boxes
(``imagenette.score_explainer``), and ``table.md`` is written to ``--out`` with the command,
machine, date, minutes and peak memory. The trained explainer is saved under the data cache
(``explainer-user-lite0``) so that an hour of training is not lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenette import (DEFAULT_ROOT, baseline_methods, imagenette_classifier, load_imagenette,  # noqa: E402
                        score_boxes, score_explainer)

from blackbox_saliency._precision import describe_cpu  # noqa: E402


def peak_gb() -> float:
    """The process's peak resident memory so far, in GB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the extracted Imagenette folder")
    parser.add_argument("--out", type=Path, default=Path("research/results/user-classifier"))
    parser.add_argument("--baselines-only", action="store_true",
                        help="train nothing; score the centre box, the whole image and Grad-CAM")
    parser.add_argument("--save-explainer", type=Path, default=None,
                        help="where the trained explainer is saved (default: ROOT/explainer-user-lite0)")
    parser.add_argument("--batch-size", type=int, default=25, help="images per call when making masks")
    parser.add_argument("--seed", type=int, default=0, help="draws the absent classes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--recipe", default=None, help="a recipe name (default: none given, as a user calls it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a recipe setting (JSON value); repeat for several")
    parser.add_argument("--steps", type=int, default=None, help="training length (default: the recipe's)")
    parser.add_argument("--no-baselines", action="store_true", help="score the explainer only")
    args = parser.parse_args()
    if args.batch_size < 1:
        parser.error(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # as the CLI and evaluate.py do: steadier CPU speed (docs/speed.md)
        from blackbox_saliency.allocator import keep_freed_memory

        heap = keep_freed_memory()
    except ImportError:
        heap = False
    started = time.perf_counter()

    data = load_imagenette(args.root)
    classifier, info = imagenette_classifier(data, return_info=True)
    cfg = classifier.pretrained_cfg
    print(f"data: {len(data.train)} training images, {len(data.heldout)} held-out with boxes; head accuracy: held-out "
          f"{info['heldout_accuracy']:.1%}, rest of val/ {info['val_accuracy']:.1%}; peak so far {peak_gb():.1f} GB",
          file=sys.stderr, flush=True)

    fit_minutes = fit_peak = None
    explainer = None
    if not args.baselines_only:
        from blackbox_saliency import fit_explainer
        from blackbox_saliency.datasets import DecodedImages

        dataset = DecodedImages(data.train.images, data.train.labels, size=cfg["input_size"][-2:],
                                mean=cfg["mean"], std=cfg["std"])
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        start = time.perf_counter()
        if args.recipe or args.overrides or args.steps:
            from blackbox_saliency.recipes import resolve_recipe

            overrides = {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in args.overrides)}
            recipe = resolve_recipe(args.recipe or "auto", classifier).replace(**overrides)
            explainer = fit_explainer(classifier, dataset, recipe, steps=args.steps, progress=False)
        else:
            explainer = fit_explainer(classifier, dataset)  # as a user calls it
        fit_minutes, fit_peak = (time.perf_counter() - start) / 60, peak_gb()
        save = args.save_explainer or data.root / "explainer-user-lite0"
        try:
            explainer.save_pretrained(save)
            print(f"explainer saved to {save}", file=sys.stderr)
        except Exception as err:  # the scores below still count
            print(f"could not save the explainer to {save}: {err}", file=sys.stderr)
        explainer.eval()

    images, labels, boxes = data.heldout.images, data.heldout.labels, data.heldout.boxes
    methods = {} if args.no_baselines else baseline_methods(classifier)
    if explainer is not None:
        def explainer_masks(x, y):
            with torch.no_grad():
                return explainer(x, y)

        methods["this library's explainer (fit_explainer)"] = (explainer_masks, True)
    reference = score_boxes(classifier, images, labels, boxes)
    rows = [("ground-truth box (first)", "0.0", f"{reference['saliency_metric']:.3f}", f"{reference['mean_box_area']:.3f}",
             "", "", "")]
    scores = {}
    for name, (masks_fn, takes_class) in methods.items():
        s = score_explainer(classifier, masks_fn, images, labels, boxes, takes_class=takes_class,
                            batch_size=args.batch_size, seed=args.seed)
        scores[name] = s
        rows.append((name, fmt(s["localisation_error"], ".1f", 100), f"{s['saliency_metric']:.3f}",
                     f"{s['mean_box_area']:.3f}", f"{s['mean_mask']:.3f}", fmt(s["absent_class_mean_mask"], ".3f"),
                     f"{s['masks_per_second']:.1f}"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)

    total_minutes, run_peak = (time.perf_counter() - started) / 60, peak_gb()
    command = "python benchmarks/fit_user_classifier.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    held = data.heldout
    if explainer is None:
        fit_line = "Explainer: none trained (`--baselines-only`)."
    else:
        how = ("the library's defaults" if not (args.recipe or args.overrides or args.steps) else
               f"recipe {explainer.config.training['recipe']!r}, overrides {explainer.config.training['overrides']}, "
               f"{explainer.config.training['steps']} steps")
        fit_line = (f"Explainer: `fit_explainer(classifier, DecodedImages({len(data.train)} training images))` with "
                    f"{how}: {fit_minutes:.1f} minutes, peak resident memory {fit_peak:.1f} GB (process "
                    f"lifetime, decoded images included).")
    lines = [
        f"A user's own classifier: timm `efficientnet_lite0` (ImageNet trunk from `load_classifier`) with a new "
        f"`Linear(1280, 10)` head fitted on the frozen features of {info['fit_images']} Imagenette `train/` images; "
        f"accuracy on the {info['heldout_images']} held-out photographs {info['heldout_accuracy']:.1%}, on the other "
        f"{info['val_images']} `val/` images {info['val_accuracy']:.1%}.",
        "",
        f"Held-out: {len(held)} ImageNet validation photographs in Imagenette ({int((~held.from_val).sum())} from "
        f"`train/`, {int(held.from_val.sum())} from `val/`), squashed to 224 px, with all their true boxes "
        f"({sum(len(b) for b in held.boxes)}; wsolevaluation), never used in any fit. The class explained is the true "
        f"label; the absent class is another of the 10, drawn with seed {args.seed}. Localisation error: tightest box "
        f"around mask > 0.5 with IoU <= 0.5 against every true box. Mean box area: share of the image in that box.",
        "",
        fit_line,
        "",
        f"Command: `{command}`  ",
        f"Machine: {describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
        f"{'; freed memory kept in the heap (keep_freed_memory)' if heap else ''}; date: {date.today()}.  ",
        f"Run: {total_minutes:.1f} minutes in all, peak resident memory {run_peak:.1f} GB (`ru_maxrss`).",
        "",
        "| method | localisation error (%) | saliency metric | mean box area | mean mask | mean mask, absent class "
        "| masks/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *["| " + " | ".join(r) + " |" for r in rows],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "scores.json").write_text(json.dumps({
        "command": command, "date": str(date.today()), "machine": describe_cpu(), "fit_minutes": fit_minutes,
        "fit_peak_gb": fit_peak, "run_minutes": total_minutes, "run_peak_gb": run_peak, "head": info,
        "ground_truth_box": reference, "methods": scores}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
