"""The ``blackbox-saliency`` command: ``explain`` images, ``fit`` an explainer, ``push``/``pull`` them.

Errors the user can act on (a bad argument, a missing or unreadable file, no network) are
reported in one line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .allocator import keep_freed_memory

__all__ = ["main"]

#: Files ``explain`` takes from a folder argument (compared case-insensitively).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class CommandError(Exception):
    """An error of the command's arguments or environment: reported in one line, exit code 2."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blackbox-saliency")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _network_errors() -> tuple[type[BaseException], ...]:
    """Error classes of the HTTP clients huggingface_hub may use, that are not OSError already.
    Only modules already imported can have raised, so nothing is imported here."""
    found = []
    for module, name in [("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException"),
                         ("huggingface_hub.errors", "HfHubHTTPError"),
                         ("huggingface_hub.errors", "EntryNotFoundError")]:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def _user_errors() -> tuple[type[BaseException], ...]:
    # OSError covers files (missing, unreadable, not writable, exists), ConnectionError and most
    # huggingface_hub errors; ValueError and ImportError are the library's argument and
    # missing-extra errors. RuntimeError is not here: see _fit.
    return (CommandError, OSError, ValueError, ImportError) + _network_errors()


def _one_line(err: BaseException) -> str:
    """The error's message on one line. An error re-raised from a DataLoader worker carries the
    worker's whole traceback; its last line is the original error."""
    text = str(err) or type(err).__name__
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = re.sub(r"^[\w.]+: ", "", last)
    return " ".join(text.split())


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackbox-saliency",
        description="Saliency masks for image classifiers (Dabkowski & Gal, 2017).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser(
        "explain",
        help="write a picture of the mask for each image",
        description="For each image write OUT/<name>_saliency.png: the mask over the image, the preserved "
        "image and the image with the evidence removed, side by side.",
    )
    exp.add_argument("images", nargs="+", type=Path,
                     help="image files (JPEG, PNG, ...) or folders of them (the image files directly in a folder, "
                     "sorted by name)")
    exp.add_argument("--classifier", default="efficientnet_lite0", help="a name from load_classifier (default: %(default)s)")
    exp.add_argument("--class-id", type=int, default=None, help="class to explain (default: the classifier's top prediction)")
    exp.add_argument("--explainer", default=None,
                     help="a trained explainer: a folder (from 'fit' or save_pretrained) or a Hub repo id")
    exp.add_argument("--method", choices=["auto", "explainer", "optimize"], default="auto",
                     help="auto: the explainer given or this project's pretrained one for the classifier, else iterative "
                     "optimisation (default: %(default)s)")
    exp.add_argument("--steps", type=int, default=300, help="optimisation steps when optimising (default: %(default)s)")
    exp.add_argument("--out", type=Path, default=Path("saliency-out"), help="output folder (default: %(default)s)")
    exp.add_argument("--save-masks", action="store_true",
                     help="also write each raw mask as OUT/<name>_mask.npy: float32 (H, W) in [0, 1] at the "
                     "classifier's input size")

    fit = sub.add_parser(
        "fit",
        help="train an explainer for a classifier on a folder of images",
        description="Train an explainer on an ImageFolder-style folder (one sub-folder per class) with a named "
        "recipe (blackbox_saliency.recipes). The class explained in training is the classifier's own prediction, so "
        "folder names need not match its classes (--set sampling.class_source=label when they are its classes, "
        "in its order).",
    )
    fit.add_argument("data", type=Path, help="image folder, one sub-folder per class")
    fit.add_argument("--classifier", default="efficientnet_lite0", help="a name from load_classifier (default: %(default)s)")
    fit.add_argument("--recipe", default="auto",
                     help="a recipe name (timm, cifar, small, paper) or auto: timm for a timm classifier with a linear "
                     "head, else small (default: %(default)s)")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="change one of the recipe's settings, e.g. --set objective.area_weight=12 or --set "
                     "schedule.batch_size=16; the value is read as JSON when it parses, else as text; repeat for several")
    fit.add_argument("--steps", type=int, default=None, help="optimiser steps in all (default: the recipe's length)")
    fit.add_argument("--epochs", type=int, default=None, help="passes over the data (default: the recipe's length)")
    fit.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    fit.add_argument("--checkpoint-dir", type=Path, default=None, help="write checkpoints here")
    fit.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--init-from", default=None, help="start from this explainer (a folder or a Hub repo id)")
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

    explainer = Explainer.from_pretrained(args.folder)  # a broken folder is never published
    try:
        url = explainer.push_to_hub(args.repo_id, private=args.private or None, token=args.token)
    except (OSError,) + _network_errors() as err:  # offline, no token, no access, server errors
        raise CommandError(f"could not upload to the Hub repo {args.repo_id} ({_one_line(err)})") from err
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from . import Explainer
    from .hub import resolve_folder

    folder = resolve_folder(args.repo_id, revision=args.revision)
    explainer = Explainer.from_pretrained(folder)
    print(f"{args.repo_id}: explains {explainer.config.classifier.name or 'an unnamed classifier'} "
          f"({explainer.num_classes} classes); files in {folder}")
    if args.out:
        explainer.save_pretrained(args.out, repo_id=args.repo_id)
        print(f"saved a copy to {args.out}")
    return 0


def _load_classifier(name: str) -> tuple[torch.nn.Module, Any]:
    from . import load_classifier

    try:
        return load_classifier(name)
    except OSError as err:  # neither shipped nor downloadable (offline, not published)
        if name != "cifar10":
            raise
        from . import hub

        folder = hub.WEIGHTS_FOLDER  # read at call time: tests point it elsewhere
        raise CommandError(
            f"--classifier cifar10: its weights are not available: not in {folder / 'classifier-cifar10'}, and the "
            f"Hub repo blackbox-saliency/classifier-cifar10 cannot be had ({_one_line(_root_cause(err))}); train them "
            f"from a source checkout with: python hub/train_cifar10.py classifier --pack CIFAR10_JPEG_PACK.tar.gz "
            f"--out {folder}"
        ) from err


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a folder")


def _image_files(paths: Sequence[Path]) -> list[Path]:
    """The arguments of ``explain`` with each folder replaced by the image files directly in it,
    sorted by name (hidden files left out); other paths are kept as given, to be read or reported."""
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not found:
            raise CommandError(f"{path}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
        files.extend(found)
    return files


def _num_logits(model: torch.nn.Module) -> int | None:
    """The classifier's class count, from one forward pass on a blank input of its size."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if not size:
        return None  # the library checks the pair itself
    with torch.no_grad():
        return int(model(torch.zeros(1, *size)).shape[1])


def _explain(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from . import Explainer, explain
    from .classifiers import imagenet_class_names
    from .hub import pretrained_for, shared_explainer
    from .visualize import denormalize, saliency_panel

    _check_out_folder(args.out)
    images = _image_files(args.images)
    model, preprocess = _load_classifier(args.classifier)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    names = model.pretrained_cfg.get("class_names")
    if names is None and model.pretrained_cfg.get("num_classes", 1000) == 1000:
        names = imagenet_class_names()
    explainer = Explainer.from_pretrained(args.explainer) if args.explainer else None
    source = args.explainer
    method = args.method
    if method in ("auto", "explainer") and explainer is None:
        known = pretrained_for(model)  # this project's explainer for the classifier, if it has one
        if known is not None:
            try:
                explainer, source = shared_explainer(known), known
                print(f"note: using the pretrained explainer {known}", file=sys.stderr)
            except (OSError, ValueError) as err:
                print(f"note: the pretrained explainer {known} is not available ({_one_line(err)})", file=sys.stderr)
    if method == "auto" and explainer is None:
        method = "optimize"
        # measured: 300 steps take about 40 s per 224 px image with Lite0 on 2 CPU cores
        print(f"note: no explainer for this classifier, so each mask is found by {args.steps} optimisation steps "
              f"(about {max(1, round(args.steps * 0.13))} s per image on a 2-core CPU)", file=sys.stderr)
    if explainer is not None and method != "optimize":
        # checked before any class id is taken from the classifier, so a mismatch is reported as one
        k = _num_logits(model)
        if k is not None and k != explainer.num_classes:
            raise CommandError(
                f"--explainer {source}: it explains a classifier of {explainer.num_classes} classes, but "
                f"--classifier {args.classifier} has {k}; an explainer works only with the classifier it was trained for"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in images:
        try:
            with Image.open(path) as image:
                x = preprocess(image).unsqueeze(0)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            print(f"{path}: cannot read image ({_one_line(err)})", file=sys.stderr)
            failures += 1
            continue
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        class_id = int(probs.argmax()) if args.class_id is None else args.class_id
        kwargs = {"steps": args.steps} if method == "optimize" else {}
        mask = explain(model, x, class_id, explainer=explainer, method=method, **kwargs)[0]
        name = names[class_id] if names and 0 <= class_id < len(names) else f"class {class_id}"
        title = f"{path.name}: {name} (p={probs[class_id]:.2f}), mask area {mask.mean():.2f}"
        stem = Path(path.name).stem  # file name only: never outside --out
        target = args.out / f"{stem}_saliency.png"
        saliency_panel(denormalize(x[0], mean, std), mask, title).save(target)
        written = str(target)
        if args.save_masks:
            mask_file = args.out / f"{stem}_mask.npy"
            np.save(mask_file, mask[0].detach().float().clamp(0, 1).cpu().numpy().astype(np.float32))
            written += f", {mask_file}"
        print(f"{title} -> {written}")
    return 1 if failures else 0


def _read_image(path: str) -> Any:
    """ImageFolder's loader, with the file named when it cannot be decoded (truncated, corrupt)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        raise OSError(f"{path}: cannot read image ({_one_line(err)})") from err


#: fit_explainer's arguments as its error messages name them -> what the command says instead.
_FIT_FLAGS = {"checkpoint_dir": "--checkpoint-dir", "resume": "--resume", "steps": "--steps", "epochs": "--epochs",
              "device": "--device", "seed": "--seed", "recipe": "--recipe", "init_from": "--init-from"}


def _as_flags(text: str) -> str:
    """A library error message with the command's flags named instead of fit_explainer's
    arguments: the leading ``name:`` the library starts messages with (a recipe setting's
    ``group.field`` becomes ``--set group.field``). Paths and other text are left as they are."""
    name, sep, rest = text.partition(": ")
    if sep and name in _FIT_FLAGS:
        text = f"{_FIT_FLAGS[name]}: {rest}"
    elif sep and "." in name and name.split(".")[0] in ("model", "objective", "schedule", "sampling", "runtime"):
        text = f"--set {name}: {rest}"
    return text.replace("resume=False", "no --resume")


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as recipe overrides, each value JSON when it parses, else text."""
    import json

    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--set {pair}: expected KEY=VALUE, e.g. --set objective.area_weight=12")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return overrides


def _with_overrides(recipe: Any, overrides: dict[str, Any]) -> Any:
    """``recipe`` with each ``--set`` applied in turn; an error names the ``--set`` key it came
    from (a key such as ``steps`` must not be reported as the ``--steps`` flag)."""
    for key, value in overrides.items():
        try:
            recipe = recipe.replace(**{key: value})
        except ValueError as err:
            text = _one_line(err)
            name, sep, rest = text.partition(": ")
            raise CommandError(f"--set {key}: {rest if sep and name == key else text}") from err
    return recipe


def _fit(args: argparse.Namespace) -> int:
    from torchvision.datasets import ImageFolder

    from . import fit_explainer
    from .recipes import resolve_recipe

    _check_out_folder(args.out)  # before training, not after it
    overrides = _parse_overrides(args.overrides)  # before the data is read
    model, preprocess = _load_classifier(args.classifier)
    try:
        recipe = resolve_recipe(args.recipe, model)
        # a folder's classes need not be the classifier's
        recipe = _with_overrides(recipe.replace(**{"sampling.class_source": "prediction"}), overrides)
        dataset = ImageFolder(str(args.data), transform=preprocess, loader=_read_image)
        explainer = fit_explainer(model, dataset, recipe, steps=args.steps, epochs=args.epochs, device=args.device,
                                  checkpoint_dir=args.checkpoint_dir, resume=args.resume, seed=args.seed,
                                  init_from=args.init_from)
    except RuntimeError as err:
        # The library's RuntimeErrors about a file or a download: an encoder's pretrained weights
        # cannot be had, or a checkpoint cannot be read. Other RuntimeErrors are bugs: traceback.
        message = str(err)
        if message.startswith("encoder:"):
            raise CommandError(f"{_one_line(err)} (or --set model.pretrained_encoder=false, or --recipe small)") from err
        if message.startswith("checkpoint_dir:") or _caused_by(err, OSError):
            raise CommandError(_as_flags(_one_line(err))) from err
        raise
    except (CommandError, OSError, ValueError, TypeError) as err:
        raise CommandError(_as_flags(_one_line(err))) from err
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process has it; one saves
        return 0
    explainer.config.classifier.name = args.classifier  # the name --classifier loads it by
    explainer.save_pretrained(args.out)
    print(f"saved explainer to {args.out} (recipe {explainer.config.training['recipe']})")
    return 0


def _caused_by(err: BaseException, kind: type[BaseException]) -> bool:
    seen = err.__cause__
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"explain": _explain, "fit": _fit, "push": _push, "pull": _pull}
    keep_freed_memory()  # this process is ours: faster on the CPU (allocator.py)
    try:
        return commands[args.command](args)
    except _user_errors() as err:
        print(f"blackbox-saliency {args.command}: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
