"""The ``blackbox-saliency`` command: ``explain`` images, ``fit`` an explainer."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackbox-saliency",
        description="Saliency masks for image classifiers (Dabkowski & Gal, 2017).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser(
        "explain",
        help="write a picture of the mask for each image",
        description="For each image write OUT/<name>_saliency.png: the mask over the image, the preserved "
        "image and the image with the evidence removed, side by side.",
    )
    exp.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    exp.add_argument("--classifier", default="efficientnet_lite0", help="a name from load_classifier (default: %(default)s)")
    exp.add_argument("--class-id", type=int, default=None, help="class to explain (default: the classifier's top prediction)")
    exp.add_argument("--explainer", default=None,
                     help="a trained explainer: a folder (from 'fit' or save_pretrained) or a Hub repo id")
    exp.add_argument("--method", choices=["auto", "explainer", "optimize"], default="auto",
                     help="auto: the explainer given or this project's pretrained one for the classifier, else iterative "
                     "optimisation (default: %(default)s)")
    exp.add_argument("--steps", type=int, default=300, help="optimisation steps when optimising (default: %(default)s)")
    exp.add_argument("--out", type=Path, default=Path("saliency-out"), help="output folder (default: %(default)s)")

    fit = sub.add_parser(
        "fit",
        help="train an explainer for a classifier on a folder of images",
        description="Train an explainer on an ImageFolder-style folder (one sub-folder per class). The class "
        "explained in training is the classifier's own prediction, so folder names need not match its classes.",
    )
    fit.add_argument("data", type=Path, help="image folder, one sub-folder per class")
    fit.add_argument("--classifier", default="efficientnet_lite0", help="a name from load_classifier (default: %(default)s)")
    fit.add_argument("--encoder", default="small", help="'small' or a timm model name (default: %(default)s)")
    fit.add_argument("--no-pretrained-encoder", action="store_true", help="start a timm encoder from random weights")
    fit.add_argument("--epochs", type=int, default=20)
    fit.add_argument("--batch-size", type=int, default=64)
    fit.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    fit.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    fit.add_argument("--checkpoint-dir", type=Path, default=None)
    fit.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images, per process")
    fit.add_argument("--preload", action="store_true", help="decode every image once and keep them on the device")
    fit.add_argument("--out", type=Path, required=True, help="folder to save the trained explainer in")

    push = sub.add_parser("push", help="upload a saved explainer folder to the Hugging Face Hub",
                          description="Upload config.json, model.safetensors and a regenerated model card to a Hub "
                          "repo (created if needed). Needs a token: --token, HF_TOKEN, or 'hf auth login'.")
    push.add_argument("folder", type=Path, help="a folder written by 'fit' or save_pretrained")
    push.add_argument("repo_id", help="owner/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")

    pull = sub.add_parser("pull", help="download an explainer from the Hugging Face Hub and check it loads",
                          description="Download an explainer into the Hub cache (or --out), load it to check it, "
                          "and print where it is.")
    pull.add_argument("repo_id", help="owner/name on the Hub")
    pull.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    pull.add_argument("--out", type=Path, default=None, help="also save a copy into this folder")
    return parser


def _push(args: argparse.Namespace) -> int:
    from . import Explainer

    url = Explainer.from_pretrained(args.folder).push_to_hub(args.repo_id, private=args.private or None, token=args.token)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from . import Explainer
    from .hub import resolve_folder

    folder = resolve_folder(args.repo_id, revision=args.revision)
    explainer = Explainer.from_pretrained(folder)
    print(f"{args.repo_id}: explains {explainer.config['classifier'].get('name', 'an unnamed classifier')} "
          f"({explainer.num_classes} classes); files in {folder}")
    if args.out:
        explainer.save_pretrained(args.out, repo_id=args.repo_id)
        print(f"saved a copy to {args.out}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from . import Explainer, explain, load_classifier
    from .classifiers import imagenet_class_names
    from .hub import cached_explainer, pretrained_for
    from .visualize import denormalize, saliency_panel

    model, preprocess = load_classifier(args.classifier)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    names = model.pretrained_cfg.get("class_names")
    if names is None and model.pretrained_cfg.get("num_classes", 1000) == 1000:
        names = imagenet_class_names()
    explainer = Explainer.from_pretrained(args.explainer) if args.explainer else None
    method = args.method
    if method in ("auto", "explainer") and explainer is None:
        known = pretrained_for(model)  # this project's explainer for the classifier, if it has one
        if known is not None:
            try:
                explainer = cached_explainer(known)
                print(f"note: using the pretrained explainer {known}", file=sys.stderr)
            except (FileNotFoundError, ValueError) as err:
                print(f"note: the pretrained explainer {known} is not available ({err})", file=sys.stderr)
    if method == "auto" and explainer is None:
        method = "optimize"
        # measured: 300 steps take about 40 s per 224 px image with Lite0 on 2 CPU cores
        print(f"note: no explainer for this classifier, so each mask is found by {args.steps} optimisation steps "
              f"(about {max(1, round(args.steps * 0.13))} s per image on a 2-core CPU)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.images:
        try:
            with Image.open(path) as image:
                x = preprocess(image).unsqueeze(0)
        except (OSError, UnidentifiedImageError) as err:
            print(f"{path}: cannot read image ({err})", file=sys.stderr)
            failures += 1
            continue
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        class_id = int(probs.argmax()) if args.class_id is None else args.class_id
        kwargs = {"steps": args.steps} if method == "optimize" else {}
        mask = explain(model, x, class_id, explainer=explainer, method=method, **kwargs)[0]
        name = names[class_id] if names and 0 <= class_id < len(names) else f"class {class_id}"
        title = f"{path.name}: {name} (p={probs[class_id]:.2f}), mask area {mask.mean():.2f}"
        target = args.out / f"{Path(path.name).stem}_saliency.png"  # file name only: never outside --out
        saliency_panel(denormalize(x[0], mean, std), mask, title).save(target)
        print(f"{title} -> {target}")
    return 1 if failures else 0


def _fit(args: argparse.Namespace) -> int:
    from torchvision.datasets import ImageFolder

    from . import fit_explainer, load_classifier

    model, preprocess = load_classifier(args.classifier)
    dataset = ImageFolder(str(args.data), transform=preprocess)
    explainer = fit_explainer(
        model, dataset, encoder=args.encoder, epochs=args.epochs, batch_size=args.batch_size, device=args.device,
        checkpoint_dir=args.checkpoint_dir, resume=args.resume, seed=args.seed, num_workers=args.workers,
        preload=args.preload, pretrained_encoder=not args.no_pretrained_encoder, max_steps=args.max_steps,
        selector="prediction",
        classifier_info={"name": args.classifier, "mean": list(model.pretrained_cfg["mean"]),
                         "std": list(model.pretrained_cfg["std"])},
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process has it; one saves
        return 0
    explainer.save_pretrained(args.out)
    print(f"saved explainer to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"explain": _explain, "fit": _fit, "push": _push, "pull": _pull}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"blackbox-saliency {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
