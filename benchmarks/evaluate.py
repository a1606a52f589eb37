"""Side-by-side evaluation of saliency methods on one classifier and one data set.

    python benchmarks/evaluate.py --data tiny-val --pack ../shared/data/tiny-imagenet-200-val.tar.gz \
        --limit 100 --out docs/results/tiny-val-lite0
    python benchmarks/evaluate.py --data imagenet-samples --pack ../shared/data/imagenet-samples.tar.gz \
        --limit 100 --out docs/results/imagenet-samples-lite0
    python benchmarks/evaluate.py --data imagenet-val --pack ../shared/data/imagenet-val-boxes.tar.gz \
        --limit 666 --out research/results/imagenet-val-lite0

Rows are methods (ground-truth boxes where the data has them, max box, centre box, gradient,
iterative mask optimisation, Grad-CAM, Captum, and this library's explainer when one is given
or known); columns are localisation error and the pointing game (where boxes exist), the
saliency metric, deletion and insertion AUC (``--faithfulness-steps`` steps), mean mask area,
mean area of the tightest box around the mask above 0.5 (the box the protocol scores),
the class probability on the preserved and on the removed image, the mean mask for an absent
class, and masks per second. Images are taken in a fixed order (the first ``--limit``
after a seeded shuffle), the class is the ground-truth label, and the removed evidence is
replaced by a blurred copy (sigma 10 at 224 px) so that every method meets the same
alternative. ``imagenet-val`` is the paper's localisation protocol on real photographs: the
ImageNet validation images squashed to 227 px, resized straight to the classifier's size
(bicubic, no crop), with all their true boxes scaled alike. Writes ``table.md`` (with the
command, machine and date) and ``figure.jpg``.
Like the CLI, it first calls ``keep_freed_memory()`` on the CPU (docs/speed.md, "The CPU's
allocator"): with glibc's own behaviour the masks/s column varied two-fold between runs of the
same explainer; ``BLACKBOX_SALIENCY_MALLOC=default`` keeps glibc's behaviour.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from blackbox_saliency import Explainer, explain, load_classifier
from blackbox_saliency.allocator import keep_freed_memory
from blackbox_saliency.baselines import BASELINES
from blackbox_saliency.datasets import ImageNetSamples, ImageNetValBoxes, TinyImageNet, cifar10, scale_boxes
from blackbox_saliency.evidence import blur_sigma_for, gaussian_blur
from blackbox_saliency.hub import pretrained_for
from blackbox_saliency.metrics import (box_area, deletion_auc, insertion_auc, localisation_error, pointing_game,
                                       saliency_metric, tightest_box)
from blackbox_saliency.visualize import denormalize, overlay, to_pil
from blackbox_saliency._precision import describe_cpu


def load_data(args, model, preprocess):
    """(images, labels, boxes or None) as tensors for the classifier."""
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    # tiny-val (64 px) and imagenet-val (227 px): resized straight to the classifier's size (no
    # crop), boxes scaled alike
    stored = {"tiny-val": 64, "imagenet-val": ImageNetValBoxes.SIZE}.get(args.data)
    tf = transforms.Compose([transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    if args.data == "tiny-val":
        data = TinyImageNet(args.pack, split="val", transform=tf, cache_dir=args.cache)
    elif args.data == "imagenet-val":
        data = ImageNetValBoxes(args.pack, transform=tf, cache_dir=args.cache)
    elif args.data == "imagenet-samples":
        data = ImageNetSamples(args.pack, transform=preprocess, cache_dir=args.cache)
    else:
        data = cifar10(args.pack, "test", transform=preprocess, cache_dir=args.cache)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.limit].tolist()
    images = torch.stack([data[i][0] for i in order])
    labels = torch.tensor([data[i][1] for i in order])
    boxes = [scale_boxes(data.boxes(i), (stored, stored), (size, size)) for i in order] if stored else None
    return images, labels, boxes


def check_explainer_args(parser, args, positive: tuple[str, ...]) -> None:
    """For the scripts that score ``--explainer`` folders: set ``--threads``, require at least one
    ``--explainer``, and the ``positive`` options at least 1 (a clear error naming each)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.explainer:
        parser.error("--explainer: give at least one")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")


def timed(fn, images, labels, batch_size):
    masks, start = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        masks.append(fn(images[i : i + batch_size], labels[i : i + batch_size]).detach().float())
    return torch.cat(masks), len(images) / (time.perf_counter() - start)


def probabilities(model, images, masks, labels, batch_size=50):
    """Mean class probability on the preserved and on the removed image (blurred alternative)."""
    kept, removed = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x, m, y = images[i : i + batch_size], masks[i : i + batch_size], labels[i : i + batch_size, None]
            blurred = gaussian_blur(x, blur_sigma_for(*x.shape[-2:]))
            kept.append(model(x * m + blurred * (1 - m)).softmax(1).gather(1, y))
            removed.append(model(x * (1 - m) + blurred * m).softmax(1).gather(1, y))
    return torch.cat(kept).mean().item(), torch.cat(removed).mean().item()


CARD_METHODS = ("this library's explainer", "Grad-CAM", "centre box", "max box")


def write_card(folder: Path, rows: list[tuple[str, ...]], data: str) -> None:
    """Put the explainer's row and its baselines' (localisation error, saliency metric, box area,
    absent-class mask, masks/s) into the explainer's ``config.evaluation``, and save it again."""
    explainer = Explainer.from_pretrained(folder)
    number = lambda text: float(text) if text not in ("", "n/a") else None  # noqa: E731
    results = [{"method": r[0], "localisation_error_percent": number(r[1]), "saliency_metric": number(r[3]),
                "box_area": number(r[7]), "absent_class_mean_mask": number(r[10]), "masks_per_s": number(r[11])}
               for r in rows if r[0].startswith(CARD_METHODS)]
    explainer.config.evaluation = {"data": data, "results": results}
    explainer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="efficientnet_lite0")
    parser.add_argument("--data", choices=["tiny-val", "imagenet-val", "imagenet-samples", "cifar10-test"],
                        required=True)
    parser.add_argument("--pack", type=Path, required=True, help="the data pack (.tar.gz) or its extracted folder")
    parser.add_argument("--cache", type=Path, default=None, help="where packs are extracted")
    parser.add_argument("--explainer", default=None, help="folder or Hub repo id (default: the known one, if any)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--optimize-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--faithfulness-steps", type=int, default=32,
                        help="steps of the deletion and insertion curves (each costs one classifier pass per image)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the method names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--card", action="store_true",
                        help="write the headline rows into the --explainer folder's model card (config.evaluation)")
    args = parser.parse_args()
    if args.card and not (args.explainer and Path(args.explainer).is_dir()):
        parser.error("--card: give --explainer as a local folder to write the card into")
    heap = keep_freed_memory()
    torch.manual_seed(args.seed)
    model, preprocess = load_classifier(args.classifier)
    images, labels, boxes = load_data(args, model, preprocess)
    k = model(images[:1]).shape[1]
    absent = (labels + torch.randint(1, k, labels.shape, generator=torch.Generator().manual_seed(args.seed + 1))) % k

    methods = {name: (lambda fn: lambda x, y: fn(model, x, y))(fn) for name, fn in BASELINES.items()}
    methods["iterative mask (explain, method='optimize')"] = lambda x, y: explain(
        model, x, y, method="optimize", steps=args.optimize_steps)
    explainer_name = args.explainer or pretrained_for(model)
    if explainer_name:
        try:
            explainer = Explainer.from_pretrained(explainer_name)
            methods["this library's explainer"] = lambda x, y: explain(model, x, y, explainer=explainer)
        except FileNotFoundError as err:
            print(f"no explainer: {err}", file=sys.stderr)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        methods = {n: f for n, f in methods.items() if any(n.startswith(w) for w in wanted)}

    rows, figure_masks = [], {}
    if boxes is not None:
        s = saliency_metric(model, images, None, labels, boxes=torch.cat([b[:1] for b in boxes]))
        rows.append(("ground-truth boxes", "0.0", "", f"{s.mean():.3f}", "", "", "", "", "", "", "", ""))
    for name, fn in methods.items():
        try:
            masks, speed = timed(fn, images, labels, args.batch_size)
        except ImportError as err:
            print(f"skipping {name}: {err}", file=sys.stderr)
            continue
        figure_masks[name] = masks[:6]
        s = saliency_metric(model, images, masks, labels).mean().item()
        error = f"{100 * localisation_error(masks, boxes):.1f}" if boxes is not None else "n/a"
        pointing = f"{100 * pointing_game(masks, boxes):.1f}" if boxes is not None else "n/a"
        deletion, insertion = (f(model, images, masks, labels, steps=args.faithfulness_steps, batch_size=50).mean().item()
                               for f in (deletion_auc, insertion_auc))
        kept, removed = probabilities(model, images, masks, labels)
        takes_class = name not in ("max box", "centre box")
        absent_area = f"{timed(fn, images, absent, args.batch_size)[0].mean():.3f}" if takes_class else "n/a"
        box = (box_area(tightest_box(masks)) / masks[0, 0].numel()).mean().item()
        rows.append((name, error, pointing, f"{s:.3f}", f"{deletion:.3f}", f"{insertion:.3f}", f"{masks.mean():.3f}",
                     f"{box:.3f}", f"{kept:.3f}", f"{removed:.3f}", absent_area, f"{speed:.1f}"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)

    with torch.no_grad():
        p_full = model(images).softmax(1).gather(1, labels[:, None]).mean().item()
        top1 = (model(images).argmax(1) == labels).float().mean().item()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/evaluate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"Classifier `{args.classifier}` on {len(images)} images of `{args.data}` (top-1 {top1:.1%}, mean probability of the "
        f"true class {p_full:.3f}); iterative mask: {args.optimize_steps} steps; deletion and insertion AUC: "
        f"{args.faithfulness_steps} steps.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {describe_cpu()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
        f"{'; freed memory kept in the heap (keep_freed_memory)' if heap else ''}; date: {date.today()}.",
        "",
        "| method | localisation error (%) | pointing game (%) | saliency metric | deletion AUC | insertion AUC | mean area "
        "| box area | p preserved | p removed | mean mask, absent class | masks/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *["| " + " | ".join(r) + " |" for r in rows],
    ]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.card:
        write_card(Path(args.explainer), rows, f"{len(images)} images of `{args.data}`, true class; `{command}`; "
                   f"{describe_cpu()}, {torch.get_num_threads()} CPU threads; {date.today()}")

    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    names = list(figure_masks)
    size = images.shape[-1]
    grid = Image.new("RGB", ((len(names) + 1) * (size + 4), 6 * (size + 4)), "white")
    for row in range(min(6, len(images))):
        pixels = denormalize(images[row], mean, std)
        grid.paste(to_pil(pixels), (0, row * (size + 4)))
        for col, name in enumerate(names, start=1):
            grid.paste(to_pil(overlay(pixels, figure_masks[name][row])), (col * (size + 4), row * (size + 4)))
    grid.save(args.out / "figure.jpg", quality=85)
    (args.out / "figure.md").write_text("Columns of figure.jpg: image, " + ", ".join(names) + ".\n")


if __name__ == "__main__":
    main()
