"""Imagenette as a library user's own data: a timm classifier with a new 10-class head, and
held-out photographs with true boxes to score explainers on.

    # once: bring the two public snapshots in with the search tool's fetch
    #   (github:thunderInfy/imagenette, github:clovaai/wsolevaluation), then extract them:
    python benchmarks/imagenette.py extract
    # decode (cached), fit the head (cached) and print its accuracy:
    nice -n 19 python benchmarks/imagenette.py summary

Other scripts import it beside them::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from imagenette import find_imagenette, load_imagenette, imagenette_classifier, score_explainer

Data. ``thunderInfy/imagenette`` holds Imagenette at 224 x 224 (``train/<wnid>/*.JPEG``, 9,469, and
``val/<wnid>/*.JPEG``, 3,925; 10 ImageNet classes). 500 of these images (366 in ``train/``, 134 in
``val/``) are ImageNet validation images, ``ILSVRC2012_val_<n>.JPEG``, squashed by Imagenette from
their original size to 224 x 224 (no crop). Their ground-truth boxes come from
``clovaai/wsolevaluation`` (``metadata/ILSVRC/test/localization.txt``: ``val/<file>,x0,y0,x1,y1``
in original pixels, one line per box, 0-based inclusive: ``x1`` reaches ``W - 1`` at most;
``image_sizes.txt``: ``val/<file>,W,H``). They are the HELD-OUT localisation set: the training set
is every other image of ``train/`` and ``val/``, and nothing here fits anything on the held-out
images. Boxes are mapped to 224 px with :func:`blackbox_saliency.datasets.scale_boxes` (inclusive
pixels, the convention of :mod:`blackbox_saliency.metrics`), and an image keeps all its boxes
(``localisation_error`` counts a hit on any of them).

Classifier. :func:`imagenette_classifier` is timm's ``efficientnet_lite0`` with the ImageNet trunk of
``load_classifier("efficientnet_lite0")`` and a new ``nn.Linear(1280, 10)`` head
(``reset_classifier(10)``), fitted by full-batch L-BFGS with a light L2 penalty on the frozen
pooled features (224 px, mean/std from ``pretrained_cfg``: 0.5/0.5). By default the head is fitted
on the ``train/`` folder only (held-out images excluded) so that the rest of ``val/`` measures its
accuracy honestly; ``fit_on="train+val"`` uses every training image. Features and head weights
are cached beside the data.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ROOT = Path(os.environ.get("BLACKBOX_SALIENCY_CACHE", Path.home() / ".cache" / "blackbox-saliency")) / "imagenette"
CLASSES_TSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet1k-classes.tsv"
MIRRORS = Path("/work/.mirror")
WSOL_FILES = ("localization.txt", "image_sizes.txt", "class_labels.txt")
HELDOUT_PREFIX = "ILSVRC2012_val_"

__all__ = ["find_imagenette", "extract_imagenette", "load_imagenette", "imagenette_classifier", "pooled_features",
           "score_explainer", "baseline_methods", "Split", "Imagenette"]


# ---------------------------------------------------------------------------------------- data

def _fix_hint(root: Path) -> str:
    return (f"bring in the snapshots with the search tool's fetch (github:thunderInfy/imagenette and "
            f"github:clovaai/wsolevaluation), then run: python benchmarks/imagenette.py extract --root {root}")


def find_imagenette(root: str | os.PathLike | None = None) -> Path:
    """The extracted Imagenette folder (``train/``, ``val/``, ``metadata/ILSVRC/test/``), default
    ``~/.cache/blackbox-saliency/imagenette``; a clear error naming what to run when it is not there."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    missing = [p for p in ("train", "val", *(f"metadata/ILSVRC/test/{f}" for f in WSOL_FILES)) if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"imagenette: {root} lacks {', '.join(missing)}; {_fix_hint(root)}")
    return root


def extract_imagenette(root: str | os.PathLike | None = None, imagenette_git: str | os.PathLike | None = None,
                       wsol_git: str | os.PathLike | None = None) -> Path:
    """Extract the two fetched snapshots (bare git directories) into ``root``: Imagenette's
    ``train/`` and ``val/`` (about 170 MB) and wsolevaluation's three ILSVRC test metadata files
    (about 8 MB; ``git archive`` of that folder fails on files the snapshot lacks, so they are
    read one by one with ``git show``)."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    imagenette_git = Path(imagenette_git or MIRRORS / "thunderInfy+imagenette" / "repo")
    wsol_git = Path(wsol_git or MIRRORS / "clovaai+wsolevaluation" / "repo")
    for git_dir in (imagenette_git, wsol_git):
        if not git_dir.is_dir():
            raise FileNotFoundError(f"imagenette: no snapshot at {git_dir}; {_fix_hint(root)}")
    root.mkdir(parents=True, exist_ok=True)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        archive = subprocess.run(["git", f"--git-dir={imagenette_git}", "archive", "HEAD", "train", "val"],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            members = [m for m in tar.getmembers() if (m.isfile() or m.isdir()) and ".." not in Path(m.name).parts
                       and not m.name.startswith("/")]
            tar.extractall(root, members=members)
    meta = root / "metadata" / "ILSVRC" / "test"
    meta.mkdir(parents=True, exist_ok=True)
    for name in WSOL_FILES:
        if not (meta / name).is_file():
            text = subprocess.run(["git", f"--git-dir={wsol_git}", "show", f"HEAD:metadata/ILSVRC/test/{name}"],
                                  check=True, capture_output=True).stdout
            tmp = meta / f".{name}.tmp"
            tmp.write_bytes(text)
            os.replace(tmp, meta / name)
    return find_imagenette(root)


@dataclass
class Split:
    """Decoded images ``(N, 3, S, S)`` uint8, labels 0..9 (sorted wnid order), ImageNet-1k
    indices, file names relative to the root, whether each came from ``val/``, and (held-out
    only) each image's ground-truth boxes ``(k, 4)`` in inclusive pixels at ``S`` px."""

    images: torch.Tensor
    labels: torch.Tensor
    imagenet: torch.Tensor
    files: list[str]
    from_val: torch.Tensor
    boxes: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class Imagenette:
    train: Split
    heldout: Split
    wnids: list[str]
    class_names: list[str]
    imagenet_index: list[int]  # ImageNet-1k index of each of the 10 classes
    root: Path = field(default=Path("."))


def _imagenet_classes() -> dict[str, tuple[int, str]]:
    path = CLASSES_TSV
    if path.is_file():
        with open(path) as handle:
            return {row[1]: (int(row[0]), row[2]) for row in csv.reader(handle, delimiter="\t") if row}
    from timm.data import ImageNetInfo  # the same order, when shared/ is not beside the checkout

    info = ImageNetInfo()
    return {info.index_to_label_name(i): (i, info.index_to_description(i)) for i in range(1000)}


def _read_wsol(root: Path) -> tuple[dict[str, list[tuple[int, ...]]], dict[str, tuple[int, int]], dict[str, int]]:
    meta = root / "metadata" / "ILSVRC" / "test"

    def rows(name):
        for line in (meta / name).read_text().splitlines():
            if line.strip():
                parts = line.strip().split(",")
                yield parts[0].split("/")[-1], [int(v) for v in parts[1:]]

    boxes: dict[str, list[tuple[int, ...]]] = {}
    for name, box in rows("localization.txt"):
        boxes.setdefault(name, []).append(tuple(box))
    sizes = {name: (v[0], v[1]) for name, v in rows("image_sizes.txt")}  # (W, H)
    labels = {name: v[0] for name, v in rows("class_labels.txt")}
    return boxes, sizes, labels


def _decode(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (224, 224):
            image = image.resize((224, 224), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _decode_all(root: Path, progress: bool) -> dict:
    """Every image of ``train/`` and ``val/`` at 224 px, with labels, file names and the
    held-out images' boxes; the cached form of :func:`load_imagenette`."""
    from blackbox_saliency.datasets import scale_boxes

    from tqdm.auto import tqdm

    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    classes = _imagenet_classes()
    files = sorted(p.relative_to(root).as_posix() for folder in ("train", "val") for p in (root / folder).glob("*/*.JPEG"))
    # training images first, then the held-out ones: each split is then a view of the cached tensor, not a copy
    files.sort(key=lambda f: Path(f).name.startswith(HELDOUT_PREFIX))
    images = torch.empty(len(files), 3, 224, 224, dtype=torch.uint8)
    for i, f in enumerate(tqdm(files, desc="decoding Imagenette", unit="image", disable=not progress)):
        images[i] = _decode(root / f)
    labels = torch.tensor([wnids.index(f.split("/")[1]) for f in files])
    heldout = torch.tensor([Path(f).name.startswith(HELDOUT_PREFIX) for f in files])
    wsol_boxes, sizes, wsol_labels = _read_wsol(root)
    boxes = {}
    for f in (f for f, h in zip(files, heldout.tolist()) if h):
        name, wnid = Path(f).name, f.split("/")[1]
        if wsol_labels.get(name) != classes[wnid][0]:
            raise ValueError(f"imagenette: {f} is ImageNet class {wsol_labels.get(name)} in wsolevaluation, "
                             f"not {classes[wnid][0]} ({wnid})")
        w, h = sizes[name]
        raw = torch.tensor(wsol_boxes[name])
        boxes[f] = scale_boxes(raw, (h, w), (224, 224)).clamp(max=223)
    return {"files": files, "images": images, "labels": labels, "heldout": heldout, "boxes": boxes, "wnids": wnids}


def load_imagenette(root: str | os.PathLike | None = None, size: int = 224, cache: bool = True,
                    progress: bool = True) -> Imagenette:
    """Imagenette decoded into memory as uint8: ``train`` (``train/`` and ``val/`` less the
    held-out ImageNet validation images) and ``heldout`` (those 500, with boxes at ``size``).

    Decoding once (about a minute on 2 cores) is cached as ``decoded-224-v2.pt`` (2 GB) in ``root``;
    other sizes are resized from it (bilinear, antialiased; boxes with ``scale_boxes``)."""
    from blackbox_saliency.datasets import scale_boxes

    root = find_imagenette(root)
    path = root / "decoded-224-v2.pt"  # v2: training images first
    if cache and path.is_file():
        raw = torch.load(path, weights_only=False)
    else:
        raw = _decode_all(root, progress)
        if cache:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            torch.save(raw, tmp)
            os.replace(tmp, path)
    classes = _imagenet_classes()
    wnids = raw["wnids"]
    index = torch.tensor([classes[w][0] for w in wnids])
    from_val = torch.tensor([f.startswith("val/") for f in raw["files"]])

    def split(select: torch.Tensor, with_boxes: bool) -> Split:
        idx = select.nonzero().flatten()
        contiguous = len(idx) and int(idx[-1] - idx[0]) + 1 == len(idx)
        images = raw["images"][int(idx[0]) : int(idx[-1]) + 1] if contiguous else raw["images"][idx]
        files = [raw["files"][i] for i in idx.tolist()]
        boxes = [raw["boxes"][f] for f in files] if with_boxes else None
        if size != 224:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=True).round().clamp(0, 255).to(torch.uint8)
            if boxes is not None:
                boxes = [scale_boxes(b, (224, 224), (size, size)).clamp(max=size - 1) for b in boxes]
        labels = raw["labels"][idx]
        return Split(images, labels, index[labels], files, from_val[idx], boxes)

    return Imagenette(train=split(~raw["heldout"], False), heldout=split(raw["heldout"], True), wnids=wnids,
                      class_names=[classes[w][1] for w in wnids], imagenet_index=index.tolist(), root=root)


# ---------------------------------------------------------------------------------- classifier

def _normalise(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """uint8 images -> the classifier's input (values in [0, 1], then its mean/std)."""
    if images.dtype != torch.uint8:
        return images
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """The classifier's pooled features ``(N, 1280)`` (the head's input) for uint8 images."""
    from tqdm.auto import tqdm

    model.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="features", unit="batch", disable=not progress):
        x = _normalise(images[i : i + batch_size], model)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out)


def _cached_features(model: nn.Module, data: Imagenette, size: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.pretrained_cfg
    path = data.root / f"features-efficientnet_lite0-{size}.pt"
    key = {"files": len(data.train) + len(data.heldout), "mean": list(cfg["mean"]), "std": list(cfg["std"]), "size": size}
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        if cached.get("key") == key:
            return cached["train"], cached["heldout"]
    train = pooled_features(model, data.train.images, progress=progress)
    heldout = pooled_features(model, data.heldout.images, progress=progress)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"key": key, "train": train, "heldout": heldout}, tmp)
    os.replace(tmp, path)
    return train, heldout


def _fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int, weight_decay: float,
              seed: int) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS: mean cross-entropy plus
    ``weight_decay / 2 * |W|^2`` (the bias is not penalised). Convex, so the start (zeros) and
    the seed matter little."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimiser = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(head(features), labels) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return head


def imagenette_classifier(data: Imagenette | None = None, root: str | os.PathLike | None = None, *,
                          fit_on: str = "train", steps: int = 300, weight_decay: float = 1e-3, seed: int = 0,
                          cache: bool = True, refit: bool = False, progress: bool = True,
                          return_info: bool = False):
    """timm's ``efficientnet_lite0`` with the ImageNet trunk of ``load_classifier("efficientnet_lite0")``
    and a new linear head for Imagenette's 10 classes, in eval mode.

    The head (``model.get_classifier()``, ``nn.Linear(1280, 10)``) is fitted on the frozen pooled
    features of the training images at 224 px (``fit_on="train"``: Imagenette's ``train/`` folder,
    held-out images excluded, so that the rest of ``val/`` scores it; ``"train+val"``: every
    training image). Its weights are saved as ``head-efficientnet_lite0.pt`` in the data folder
    and loaded from there next time (``refit=True`` fits again). ``pretrained_cfg`` says
    ``num_classes=10`` and gives ``class_names``. With ``return_info=True`` returns
    ``(model, info)``, ``info`` holding the accuracies (held-out images, rest of ``val/``, the
    training features) and how the head was fitted."""
    from blackbox_saliency import load_classifier

    if fit_on not in ("train", "train+val"):
        raise ValueError(f"fit_on: expected 'train' or 'train+val', got {fit_on!r}")
    data = data if data is not None else load_imagenette(root, progress=progress)
    model, _ = load_classifier("efficientnet_lite0")
    cfg = dict(model.pretrained_cfg)
    size = cfg.get("input_size", (3, 224, 224))[-1]
    if data.train.images.shape[-1] != size:
        raise ValueError(f"data: images are {data.train.images.shape[-1]} px, the classifier takes {size} px")
    model.reset_classifier(len(data.wnids))
    model.pretrained_cfg = dict(cfg, num_classes=len(data.wnids), class_names=list(data.class_names))
    path = data.root / "head-efficientnet_lite0.pt"
    settings = {"fit_on": fit_on, "steps": steps, "weight_decay": weight_decay, "seed": seed, "optimiser": "L-BFGS",
                "mean": list(cfg["mean"]), "std": list(cfg["std"]), "size": size,
                "training_images": len(data.train), "wnids": list(data.wnids)}
    saved = torch.load(path, weights_only=False) if cache and path.is_file() and not refit else None
    if saved is not None and saved["settings"] == settings:
        model.get_classifier().load_state_dict(saved["head"])
        info = saved["info"]
    else:
        start = time.perf_counter()
        train_features, heldout_features = (_cached_features(model, data, size, progress) if cache else
                                            (pooled_features(model, data.train.images, progress=progress),
                                             pooled_features(model, data.heldout.images, progress=progress)))
        featured = time.perf_counter()
        fit = ~data.train.from_val if fit_on == "train" else torch.ones(len(data.train), dtype=torch.bool)
        head = _fit_head(train_features[fit], data.train.labels[fit], len(data.wnids), steps, weight_decay, seed)
        model.get_classifier().load_state_dict(head.state_dict())
        with torch.no_grad():
            predicted = head(train_features).argmax(1)
            heldout_predicted = head(heldout_features).argmax(1)
        correct = predicted == data.train.labels
        rest_of_val = data.train.from_val
        info = {
            "heldout_accuracy": (heldout_predicted == data.heldout.labels).float().mean().item(),
            "heldout_images": len(data.heldout),
            "val_accuracy": correct[rest_of_val].float().mean().item(),
            "val_images": int(rest_of_val.sum()),
            "val_seen_in_fit": fit_on != "train",
            "fit_accuracy": correct[fit].float().mean().item(),
            "fit_images": int(fit.sum()),
            "feature_seconds": featured - start if cache else None,
            "fit_seconds": time.perf_counter() - featured,
        }
        if cache:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            torch.save({"settings": settings, "head": model.get_classifier().state_dict(), "info": info}, tmp)
            os.replace(tmp, path)
    model.eval()
    return (model, info) if return_info else model


# ------------------------------------------------------------------------------------- scoring

MasksFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def baseline_methods(classifier: nn.Module) -> dict[str, tuple[MasksFn, bool]]:
    """Name -> ``(masks_fn(images, class_ids), takes_class)`` for the centre box, the whole
    image and Grad-CAM (``blackbox_saliency.baselines``)."""
    from blackbox_saliency import baselines

    return {
        "centre box": (lambda x, y: baselines.centre_box(classifier, x, y), False),
        "whole image": (lambda x, y: baselines.max_box(classifier, x, y), False),
        "Grad-CAM": (lambda x, y: baselines.grad_cam(classifier, x, y), True),
    }


def absent_classes(labels: torch.Tensor, classes: int, seed: int = 0) -> torch.Tensor:
    """For each image another of the ``classes`` classes than its label, drawn with ``seed``."""
    shift = torch.randint(1, classes, labels.shape, generator=torch.Generator().manual_seed(seed))
    return (labels + shift) % classes


def _masks(masks_fn: MasksFn, images: torch.Tensor, class_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
    out, start = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        out.append(masks_fn(images[i : i + batch_size], class_ids[i : i + batch_size]).detach().float().cpu())
    return torch.cat(out), len(images) / (time.perf_counter() - start)


def score_explainer(classifier: nn.Module, masks_fn: MasksFn, images: torch.Tensor, labels: torch.Tensor,
                    boxes: Sequence[torch.Tensor], *, takes_class: bool = True, batch_size: int = 25,
                    seed: int = 0, threshold: float = 0.5) -> dict:
    """Score a method on the held-out images.

    Args:
        classifier: the 10-class classifier (its ``pretrained_cfg`` mean/std normalise uint8 images).
        masks_fn: ``(images, class_ids) -> masks (N, 1, H, W)`` in [0, 1], such as an
            ``Explainer`` or one of :func:`baseline_methods`.
        images: ``(N, 3, H, W)``, uint8 (normalised here) or already normalised float.
        labels: ``(N,)`` classes 0..9, the class explained.
        boxes: per image its ground-truth boxes ``(k, 4)``, inclusive pixels.
        takes_class: whether the method's mask depends on the class; then the mean mask for an
            absent class (another of the classes, drawn with ``seed``) is measured too.

    Returns a dict: ``localisation_error`` (share of images whose tightest box at ``threshold``
    has IoU <= 0.5 with every true box), ``saliency_metric`` (mean; lower is better),
    ``mean_box_area`` (share of the image inside the tightest box), ``mean_mask``,
    ``absent_class_mean_mask`` (``None`` when the method takes no class), ``masks_per_second``, ``images``.
    """
    from blackbox_saliency.metrics import box_area, localisation_error, saliency_metric, tightest_box

    images = _normalise(images, classifier)
    labels = torch.as_tensor(labels, dtype=torch.long)
    classifier.eval()
    masks, speed = _masks(masks_fn, images, labels, batch_size)
    height, width = images.shape[-2:]
    result = {
        "images": len(images),
        "localisation_error": localisation_error(masks, list(boxes), threshold=threshold),
        "saliency_metric": saliency_metric(classifier, images, masks, labels, threshold=threshold).mean().item(),
        "mean_box_area": (box_area(tightest_box(masks, threshold)) / (height * width)).mean().item(),
        "mean_mask": masks.mean().item(),
        "absent_class_mean_mask": None,
        "masks_per_second": speed,
    }
    if takes_class:
        k = int(classifier.pretrained_cfg.get("num_classes") or classifier.get_classifier().out_features)
        absent, _ = _masks(masks_fn, images, absent_classes(labels, k, seed), batch_size)
        result["absent_class_mean_mask"] = absent.mean().item()
    return result


def score_boxes(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                boxes: Sequence[torch.Tensor]) -> dict:
    """The reference row: the saliency metric of each image's first true box, and the mean
    share of the image inside it."""
    from blackbox_saliency.metrics import box_area, saliency_metric

    images = _normalise(images, classifier)
    first = torch.stack([b[0] for b in boxes])
    return {"saliency_metric": saliency_metric(classifier, images, None, torch.as_tensor(labels), boxes=first).mean().item(),
            "mean_box_area": (box_area(first) / (images.shape[-2] * images.shape[-1])).mean().item()}


# ------------------------------------------------------------------------------------------ CLI

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ext = sub.add_parser("extract", help="extract the fetched snapshots into --root")
    ext.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ext.add_argument("--imagenette-git", type=Path, default=None, help="bare git dir of thunderInfy/imagenette")
    ext.add_argument("--wsol-git", type=Path, default=None, help="bare git dir of clovaai/wsolevaluation")
    summ = sub.add_parser("summary", help="decode, fit the head (both cached), print counts and accuracy")
    summ.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    summ.add_argument("--fit-on", choices=["train", "train+val"], default="train")
    summ.add_argument("--refit", action="store_true")
    args = parser.parse_args()
    if args.command == "extract":
        print(extract_imagenette(args.root, args.imagenette_git, args.wsol_git))
        return
    data = load_imagenette(args.root)
    model, info = imagenette_classifier(data, fit_on=args.fit_on, refit=args.refit, return_info=True)
    boxes_per_image = torch.tensor([len(b) for b in data.heldout.boxes])
    print(f"training images: {len(data.train)} ({int((~data.train.from_val).sum())} train/, "
          f"{int(data.train.from_val.sum())} val/); held-out with boxes: {len(data.heldout)} "
          f"({int((~data.heldout.from_val).sum())} from train/, {int(data.heldout.from_val.sum())} from val/; "
          f"{int(boxes_per_image.sum())} boxes, {int((boxes_per_image > 1).sum())} images with several)")
    print(f"classes: {', '.join(f'{w} {n}' for w, n in zip(data.wnids, data.class_names))}")
    print(f"head: {model.get_classifier()}; accuracy on held-out {info['heldout_accuracy']:.1%} "
          f"({info['heldout_images']}), rest of val/ {info['val_accuracy']:.1%} ({info['val_images']}"
          f"{', seen in the fit' if info['val_seen_in_fit'] else ', not seen in the fit'}), "
          f"fit set {info['fit_accuracy']:.1%} ({info['fit_images']})")


if __name__ == "__main__":
    main()
