"""Readers for the evaluation data packs (CIFAR-10, Tiny ImageNet with boxes, ImageNet samples,
ImageNet validation photographs with boxes).

These serve the benchmarks and tests; with your own data keep using torchvision or timm
loaders. A pack is a ``.tar.gz``; :func:`extract_pack` unpacks it once into a cache folder.
Boxes are ``x0, y0, x1, y1`` inclusive pixels of the image as stored; :func:`scale_boxes` maps
them through a resize.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = ["extract_pack", "cifar10", "TinyImageNet", "ImageNetSamples", "DecodedImages", "imagenet_wnid_to_index",
           "scale_boxes", "ImageNetValBoxes"]

DEFAULT_CACHE = Path(os.environ.get("BLACKBOX_SALIENCY_CACHE", Path.home() / ".cache" / "blackbox-saliency"))


def extract_pack(pack: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack ``pack`` into ``cache_dir/<pack name>`` once and return that folder.

    The pack is unpacked into a temporary folder that is then renamed into place, so the folder
    appears complete or not at all: an interrupted extraction is redone, and several processes
    (``torchrun``) may call this at once."""
    pack = Path(pack)
    if not pack.is_file():
        raise FileNotFoundError(f"pack: {pack} does not exist")
    target = Path(cache_dir or DEFAULT_CACHE) / pack.name.replace(".tar.gz", "").replace(".tgz", "")
    marker = target / ".extracted"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp's 0700 would hide the folder from everyone else
    try:
        with tarfile.open(pack) as tar:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
            for m in members:  # never write outside the target folder
                if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts:
                    raise ValueError(f"pack: {pack} has an unsafe path {m.name!r}")
            tar.extractall(scratch, members=members)
        (scratch / marker.name).write_text("ok\n")
        if target.exists() and not marker.exists():  # left half-written by an older version
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(scratch, target)
        except OSError:
            if not marker.exists():  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def imagenet_wnid_to_index() -> dict[str, int]:
    """WordNet id -> ImageNet-1k class index, in the order timm and torchvision models use."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {info.index_to_label_name(i): i for i in range(1000)}


def scale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Map inclusive pixel boxes from an image of ``from_size = (H, W)`` to a resized one."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    boxes = boxes.float()
    out = torch.stack([boxes[:, 0] * sx, boxes[:, 1] * sy, (boxes[:, 2] + 1) * sx - 1, (boxes[:, 3] + 1) * sy - 1], 1)
    return out.round().long().clamp(min=0)


def cifar10(root_or_pack: str | os.PathLike, split: str = "test", transform: Callable | None = None,
            cache_dir: str | os.PathLike | None = None):
    """CIFAR-10 as a torchvision ``ImageFolder`` (class index = sorted folder name, which is
    CIFAR-10's own order), from the pack or an extracted folder."""
    from torchvision.datasets import ImageFolder

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(root_or_pack)
    if root.is_file():
        root = extract_pack(root, cache_dir)
    return ImageFolder(str(root / "cifar10" / split), transform=transform)


class TinyImageNet(Dataset):
    """Tiny ImageNet 200 (64 px) with its ground-truth boxes.

    Items are ``(image, label)`` with the label as an ImageNet-1k index (``label_space=
    "imagenet1k"``, for ImageNet classifiers) or the index among the 200 classes (``"tiny"``).
    ``boxes(i)`` gives that image's boxes ``(k, 4)`` in the stored 64 px image.

    Args:
        roots: extracted pack folders or pack files (several train packs may be combined).
        split: ``"val"`` or ``"train"``.
    """

    def __init__(self, roots: str | os.PathLike | Sequence[str | os.PathLike], split: str = "val",
                 transform: Callable | None = None, label_space: str = "imagenet1k",
                 cache_dir: str | os.PathLike | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        if label_space not in ("imagenet1k", "tiny"):
            raise ValueError(f"label_space: expected 'imagenet1k' or 'tiny', got {label_space!r}")
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        folders = [extract_pack(r, cache_dir) if Path(r).is_file() else Path(r) for r in roots]
        self.transform = transform
        self.items: list[tuple[Path, str, torch.Tensor]] = []
        for folder in folders:
            base = folder / "tiny-imagenet-200"
            if split == "val":
                annotations = base / "val" / "val_annotations.txt"
                for line in annotations.read_text().splitlines():
                    name, wnid, *box = line.split()
                    path = base / "val" / "images" / name
                    if path.exists():
                        self.items.append((path, wnid, torch.tensor([[int(v) for v in box]])))
            else:
                for class_dir in sorted(p for p in (base / "train").iterdir() if p.is_dir()):
                    wnid = class_dir.name
                    boxes_file = class_dir / f"{wnid}_boxes.txt"
                    boxes = {}
                    if boxes_file.exists():
                        for line in boxes_file.read_text().splitlines():
                            name, *box = line.split()
                            boxes[name] = torch.tensor([[int(v) for v in box]])
                    for path in sorted((class_dir / "images").glob("*.JPEG")):
                        self.items.append((path, wnid, boxes.get(path.name, torch.zeros(0, 4, dtype=torch.long))))
        if not self.items:
            raise FileNotFoundError(f"roots: no Tiny ImageNet {split} images found in {[str(f) for f in folders]}")
        wnids = sorted({wnid for _, wnid, _ in self.items})
        self.tiny_classes = wnids
        mapping = imagenet_wnid_to_index() if label_space == "imagenet1k" else {w: i for i, w in enumerate(wnids)}
        self.labels = [mapping[wnid] for _, wnid, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, _, _ = self.items[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), self.labels[index]

    def boxes(self, index: int) -> torch.Tensor:
        return self.items[index][2].clone()


class ImageNetSamples(Dataset):
    """The ImageNet sample images (``<wnid>_<name>.JPEG``, short side 256), labelled with
    their ImageNet-1k index."""

    def __init__(self, root_or_pack: str | os.PathLike, transform: Callable | None = None,
                 cache_dir: str | os.PathLike | None = None):
        root = Path(root_or_pack)
        if root.is_file():
            root = extract_pack(root, cache_dir)
        files = sorted(root.rglob("*.JPEG"))
        if not files:
            raise FileNotFoundError(f"root_or_pack: no .JPEG images in {root}")
        mapping = imagenet_wnid_to_index()
        self.files = files
        self.labels = [mapping[f.name.split("_")[0]] for f in files]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        with Image.open(self.files[index]) as image:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), self.labels[index]


class DecodedImages(Dataset):
    """Images held decoded in memory as ``uint8`` at their stored size, resized and normalised
    a whole batch at a time: the data path that keeps a CPU training step fed.

    Decoding a JPEG and resizing it per item, in a loader, is slower on a CPU than the training
    step itself (measured 1-2 images/s for Tiny ImageNet at 128 px, docs/fit.md); here each image
    is decoded once, and :meth:`batch` indexes the ``uint8`` tensor, crops and resizes on the
    tensor. :func:`~blackbox_saliency.fit_explainer` reads a dataset that has ``batch`` a batch at
    a time, with no DataLoader.

    Args:
        images: ``(N, C, h, w)`` ``uint8`` tensor, all of one stored size.
        labels: ``N`` integer class ids.
        size: the size ``(H, W)`` (or one int) the classifier takes; images are resized to it.
        mean, std: per-channel normalisation of values in ``[0, 1]``, as the classifier expects.
        crop_scale: in :meth:`batch` (training), each image is a random square crop covering a
            share of the image drawn from this range, resized to ``size`` (scale augmentation;
            ``(1, 1)``: the whole image). Items read with ``dataset[i]`` are always whole.

    Example:
        >>> data = DecodedImages(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), [0, 1, 2, 3], size=128)
        >>> images, labels = data.batch(torch.tensor([0, 2]))
        >>> tuple(images.shape), labels.tolist()
        ((2, 3, 128, 128), [0, 2])
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int] | torch.Tensor, size: int | Sequence[int],
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 crop_scale: tuple[float, float] = (1.0, 1.0)):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images: expected a uint8 tensor (N, C, h, w), got {got}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels: expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size: expected an int or (H, W), got {size!r}")
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale: expected 0 < low <= high <= 1, got {crop_scale!r}")
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean, std: expected {c} values each, got {len(mean)} and {len(std)}")
        self.images, self.labels, self.size, self.crop_scale = images, labels, size, (float(lo), float(hi))
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)

    @classmethod
    def decode(cls, dataset: Dataset, size: int | Sequence[int], mean: Sequence[float] = (0.5, 0.5, 0.5),
               std: Sequence[float] = (0.5, 0.5, 0.5), crop_scale: tuple[float, float] = (1.0, 1.0),
               stored_size: int | Sequence[int] | None = None, progress: bool = True) -> "DecodedImages":
        """Decode every item of a dataset of ``(PIL image, label)`` (such as :class:`TinyImageNet`,
        :class:`ImageNetSamples` or an ``ImageFolder`` without a transform) once. Images not of
        ``stored_size`` (default: the first image's) are resized to it as they are decoded."""
        first = dataset[0][0]
        if not isinstance(first, Image.Image):
            raise TypeError(f"dataset: expected items (PIL image, label) with no transform, got {type(first).__name__}")
        if stored_size is None:
            stored = (first.height, first.width)
        else:
            stored = (stored_size, stored_size) if isinstance(stored_size, int) else tuple(stored_size)
        images = torch.empty(len(dataset), 3, *stored, dtype=torch.uint8)
        labels = []
        for i in tqdm(range(len(dataset)), disable=not progress, desc="decoding", unit="image"):
            image, label = dataset[i]
            image = image.convert("RGB")
            if (image.height, image.width) != stored:
                image = image.resize((stored[1], stored[0]), Image.BICUBIC)
            images[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
            labels.append(int(label))
        return cls(images, labels, size, mean, std, crop_scale)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "DecodedImages":
        """The same images at ``indices`` (copied), with the same size, normalisation and crops."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        c = self.images.shape[1]
        return DecodedImages(self.images[indices], self.labels[indices], self.size, self._mean.view(c).tolist(),
                             self._std.view(c).tolist(), self.crop_scale)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        return (images / 255.0 - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index : index + 1].float()
        if tuple(image.shape[-2:]) != self.size:
            image = F.interpolate(image, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self._finish(image)[0], int(self.labels[index])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` (float32, normalised) and labels ``(B,)`` for ``indices``, each
        image a random crop within ``crop_scale`` (drawn from torch's global generator, so a
        seeded run repeats) resized to ``size``."""
        from torchvision.ops import roi_align

        indices = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[indices].float()
        lo, hi = self.crop_scale
        if (lo, hi) == (1.0, 1.0):
            if tuple(images.shape[-2:]) != self.size:
                images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            return self._finish(images), self.labels[indices]
        n, (h, w) = images.shape[0], images.shape[-2:]
        side = (torch.empty(n).uniform_(lo, hi)).sqrt()  # a square covering this share of the image
        ch, cw = side * h, side * w
        y0, x0 = torch.rand(n) * (h - ch), torch.rand(n) * (w - cw)
        boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
        # one bilinear sample at each output pixel's centre: a plain crop-and-resize
        crops = roi_align(images, boxes, output_size=self.size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
        return self._finish(crops), self.labels[indices]


class ImageNetValBoxes(Dataset):
    """ImageNet (ILSVRC2012) validation photographs squashed without crop to 227 x 227, with
    every ground-truth box of the image's class: the pack ``imagenet-val-boxes.tar.gz``, on which
    the paper's localisation protocol runs.

    Items are ``(image, class_index)`` with the ImageNet-1k index (timm's order) from the pack's
    ``annotations.tsv``; ``boxes(i)`` gives that image's boxes, a float tensor ``(k, 4)`` of
    inclusive pixels ``x0, y0, x1, y1`` in the stored 227 px image (map them through a resize
    with :func:`scale_boxes`).

    The pack's boxes are the original inclusive boxes times ``227 / W`` and ``227 / H``, rounded,
    so a box touching the right or bottom edge can end at 227, one pixel past the image; such
    coordinates are clamped to 226, the last pixel.

    Args:
        pack_or_folder: the pack (``.tar.gz``) or a folder holding ``imagenet-val-boxes/`` (or
            the extracted ``imagenet-val-boxes`` folder itself).
    """

    SIZE = 227
    COLUMNS = ("file", "class_index", "wnid", "boxes_x0_y0_x1_y1", "original_size")

    def __init__(self, pack_or_folder: str | os.PathLike, transform: Callable | None = None,
                 cache_dir: str | os.PathLike | None = None):
        root = Path(pack_or_folder)
        if not root.exists():
            raise FileNotFoundError(f"pack_or_folder: {root} does not exist")
        if root.is_file():
            try:
                root = extract_pack(root, cache_dir)
            except tarfile.TarError as err:
                raise ValueError(f"pack_or_folder: {root} is not a readable .tar.gz pack ({err})") from err
        folder = next((f for f in (root / "imagenet-val-boxes", root) if (f / "annotations.tsv").is_file()), None)
        if folder is None:
            raise FileNotFoundError(f"pack_or_folder: no imagenet-val-boxes/annotations.tsv in {root}")
        annotations = folder / "annotations.tsv"
        lines = annotations.read_text().splitlines()
        header = tuple(lines[0].split("\t")) if lines else ()
        if header[: len(self.COLUMNS)] != self.COLUMNS:
            raise ValueError(f"pack_or_folder: {annotations} should start with the header {self.COLUMNS}, got {header}")
        self.transform = transform
        self.files: list[Path] = []
        self.labels: list[int] = []
        self.wnids: list[str] = []
        self._boxes: list[torch.Tensor] = []
        last = float(self.SIZE - 1)
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                name, class_index, wnid, boxes, _ = line.split("\t")[:5]
                label = int(class_index)
                values = torch.tensor([[float(v) for v in box.split(",")] for box in boxes.split(";")])
                if not 0 <= label < 1000 or values.shape[1] != 4:
                    raise ValueError
            except (ValueError, RuntimeError):
                raise ValueError(f"pack_or_folder: {annotations} line {number} is not "
                                 f"file, class_index (0-999), wnid, boxes x0,y0,x1,y1;..., size: {line!r}") from None
            path = folder / "images" / name
            if not path.is_file():
                raise FileNotFoundError(f"pack_or_folder: {annotations} line {number} names {name}, not in {path.parent}")
            if ((values[:, 2] < values[:, 0]) | (values[:, 3] < values[:, 1])).any():
                raise ValueError(f"pack_or_folder: {annotations} line {number} has a box with x1 < x0 or y1 < y0")
            self.files.append(path)
            self.labels.append(label)
            self.wnids.append(wnid)
            self._boxes.append(values.clamp(0, last))
        if not self.files:
            raise FileNotFoundError(f"pack_or_folder: {annotations} lists no images")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        with Image.open(self.files[index]) as image:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), self.labels[index]

    def boxes(self, index: int) -> torch.Tensor:
        return self._boxes[index].clone()
