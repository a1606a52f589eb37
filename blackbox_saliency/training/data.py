"""Training data: checks on what a dataset gives, the batches of each epoch, loaders, preloading,
and the per-batch sampling of a recipe (random square crops, resolution, flips)."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from .._distributed import LOCAL, BatchShard
from ..recipes import Sampling

_TO_FLOAT = ("convert images to float and normalise them as the classifier expects "
             "(e.g. ToTensor() then Normalize(mean, std))")


def check_dataset(dataset: object) -> tuple[torch.Tensor, int]:
    """A non-empty map-style dataset of ``(image (C,H,W) float tensor, int label)``: item 0 is
    checked here, every other one as its batch is assembled."""
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"dataset: expected a map-style torch Dataset (with __len__ and __getitem__), "
                        f"got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset: is empty")
    return check_item(dataset[0], 0)


def _kind(value: object) -> str:
    return f"a {type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list)) else f"a {type(value).__name__}"


def check_item(item: object, index: int, channels: int | None = None) -> tuple[torch.Tensor, int]:
    """Item ``index``: an ``(image, label)`` pair, the image a float ``(C, H, W)`` tensor (with
    ``channels`` channels, those of item 0), the label an integer class id."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"dataset: items must be (image, label) pairs, but item {index} is {_kind(item)}")
    image, label = item
    what = "dataset: images must be float tensors (C, H, W) as the classifier takes them"
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{what} (add a ToTensor and Normalize transform), but item {index}'s is a {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(f"{what}, but item {index}'s is a {image.dtype} tensor: {_TO_FLOAT}")
    if image.dim() != 3:
        raise TypeError(f"{what}, but item {index}'s has shape {tuple(image.shape)}")
    if channels is not None and image.shape[0] != channels:
        raise ValueError(f"dataset: item {index}'s image has {image.shape[0]} channels but item 0's has {channels}")
    if isinstance(label, torch.Tensor):
        if label.numel() != 1 or label.is_floating_point() or label.dtype == torch.bool:
            raise TypeError(f"dataset: labels must be integer class ids, item {index}'s is a tensor {label.dtype} "
                            f"{tuple(label.shape)}")
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"dataset: labels must be integer class ids, item {index}'s is a {type(label).__name__}")
    return image, int(label)


def mixed_sizes(index: int, shape: Sequence[int], other: int, other_shape: Sequence[int]) -> ValueError:
    return ValueError(f"dataset: item {index}'s image is {tuple(shape)} but item {other}'s is {tuple(other_shape)}; "
                      "every image must have the same size (resize or crop them in the dataset's transform)")


class _Indexed(Dataset):
    """``dataset[i]`` as ``(i, dataset[i])``: the collate then knows which item it checks."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class _CheckedCollate:
    """The loader's collate (run in its workers): every item checked, and every image the size
    of item 0's, ``shape``, before torch's own collate stacks them."""

    def __init__(self, shape: Sequence[int]):
        self.shape = torch.Size(shape)

    def __call__(self, batch: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = []
        for index, item in batch:
            image, label = check_item(item, index, self.shape[0])
            if image.shape != self.shape:
                raise mixed_sizes(index, image.shape, 0, self.shape)
            pairs.append((image, label))
        images, labels = default_collate(pairs)
        return images, labels


def check_read_batch(result: object, rows: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a dataset's ``batch(indices)`` returned: float images ``(B, *shape)`` and ``B``
    integer labels."""
    what = "dataset: batch(indices) must return (images, labels)"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(f"{what}, returned {_kind(result)}")
    images, labels = result
    n = len(rows)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} with float images (B, C, H, W), returned images of type {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{what} with float images (B, C, H, W), returned {images.dtype} images: {_TO_FLOAT}")
    if images.dim() != 4 or images.shape[0] != n or images.shape[1:] != torch.Size(shape):
        raise ValueError(f"{what} with images {(n, *shape)} for {n} indices (item 0's image is {tuple(shape)}), "
                         f"returned {tuple(images.shape)}")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or tuple(labels.shape) != (n,):
        raise TypeError(f"{what} with {n} integer labels, returned a {labels.dtype} tensor of shape {tuple(labels.shape)}")
    return images, labels


def check_values(images: torch.Tensor, labels: torch.Tensor, rows: Sequence[int], num_classes: int, where: str) -> None:
    """Every label a class of the classifier, every pixel finite. A sum is finite only if every
    element is (or it overflowed), so a clean batch costs one reduction."""
    labels = torch.as_tensor(labels)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        i = int(((labels < 0) | (labels >= num_classes)).nonzero()[0, 0])
        raise ValueError(f"dataset: item {rows[i]} has label {int(labels[i])}, outside 0..{num_classes - 1} "
                         f"(the classifier returns {num_classes} classes)")
    if not torch.isfinite(images.sum()):
        bad = (~torch.isfinite(images.reshape(images.shape[0], -1)).all(1)).nonzero().flatten().tolist()
        if bad:  # else the sum of finite values overflowed
            listed = ", ".join(str(rows[i]) for i in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise ValueError(f"dataset: NaN or infinite values in item{'s' if len(bad) > 1 else ''} {listed} ({where}): "
                             "bad data in the dataset, not a training instability; fix or drop those items")


def dataset_labels(dataset: object) -> torch.Tensor | None:
    """Every item's label when the dataset holds them as a sequence (``labels``, torchvision's
    ``targets``, a ``TensorDataset``'s second tensor, through a ``Subset``), else ``None``."""
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    else:
        labels = getattr(dataset, "labels", None)
        labels = getattr(dataset, "targets", None) if labels is None else labels
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return None
    return labels.long() if labels.dim() == 1 and not labels.is_floating_point() and len(labels) == len(dataset) else None


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches: a permutation fixed by ``(seed, epoch)``, so a resumed run sees the
    same batches as an uninterrupted one. The last partial batch is dropped (BatchNorm)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def preload(dataset: Dataset, device: torch.device, num_workers: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label of ``dataset`` as two tensors on ``device``, each item checked."""
    image0, _ = check_item(dataset[0], 0)
    needed = len(dataset) * image0.numel() * 4
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if needed > free // 2:
            raise ValueError(f"runtime.preload: the dataset takes {needed / 2**30:.1f} GiB and {device} has "
                             f"{free / 2**30:.1f} GiB free; leave room for training (preload=False streams it)")
    images = torch.empty(len(dataset), *image0.shape, device=device)
    labels = torch.empty(len(dataset), dtype=torch.long, device=device)
    # its own generator: a loader seeds itself from the global RNG, which the training draws use
    loader = DataLoader(_Indexed(dataset), batch_size=256, num_workers=num_workers, pin_memory=device.type == "cuda",
                        collate_fn=_CheckedCollate(image0.shape), generator=torch.Generator())
    start = 0
    for batch_images, batch_labels in loader:
        n = batch_images.shape[0]
        check_values(batch_images, batch_labels, range(start, start + n), num_classes, "read by preload")
        images[start : start + n].copy_(batch_images, non_blocking=True)
        labels[start : start + n].copy_(torch.as_tensor(batch_labels), non_blocking=True)
        start += n
    return images, labels


class BatchSource:
    """The batches of a dataset: a whole batch at a time from a dataset with ``batch(indices)``
    (:class:`~blackbox_saliency.datasets.DecodedImages`), from tensors preloaded on the device,
    or through a DataLoader, every item checked."""

    def __init__(self, dataset: Dataset, device: torch.device, num_classes: int, num_workers: int = 0,
                 preloaded: bool = False):
        self.dataset, self.device, self.num_classes, self.num_workers = dataset, device, num_classes, num_workers
        self.shape = check_item(dataset[0], 0)[0].shape  # every batch must match item 0
        self.reader = getattr(dataset, "batch", None)
        self.data = preload(dataset, device, num_workers, num_classes) if preloaded and not callable(self.reader) else None

    def batches(self, rows: list[list[int]], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` on the device for each list of dataset indices in ``rows``."""
        if self.data is not None:
            for index in rows:
                index = torch.tensor(index).to(self.device)
                yield self.data[0][index], self.data[1][index]
            return
        if callable(self.reader):
            loader: Any = (check_read_batch(self.reader(torch.tensor(r)), r, self.shape) for r in rows)
        else:  # its own generator: one drawn from the global RNG would shift every draw after a resume
            loader = DataLoader(_Indexed(self.dataset), batch_sampler=rows, num_workers=self.num_workers,
                                collate_fn=_CheckedCollate(self.shape), pin_memory=self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(seed))
        for index, (images, labels) in zip(rows, loader):
            check_values(images, labels, index, self.num_classes, "in a training batch")
            yield images.to(self.device, non_blocking=True), torch.as_tensor(labels).to(self.device).long()


def square_crops(images: torch.Tensor, scale: tuple[float, float], size: tuple[int, int],
                 shard: BatchShard = LOCAL) -> torch.Tensor:
    """Each image a random square crop covering a share of it drawn from ``scale``, resized to
    ``size`` (bilinear, averaging over each output pixel's area when shrinking). Draws are the
    whole global batch's (``shard``), so several processes crop as one would."""
    from torchvision.ops import roi_align

    n, (h, w) = images.shape[0], images.shape[-2:]
    side = (shard.rand(n) * (scale[1] - scale[0]) + scale[0]).sqrt()
    ch, cw = side * h, side * w
    y0, x0 = shard.rand(n) * (h - ch), shard.rand(n) * (w - cw)
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    return roi_align(images, boxes.to(images.device, images.dtype), output_size=size, spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


def sample(images: torch.Tensor, sampling: Sampling, resolution: float, shard: BatchShard = LOCAL) -> torch.Tensor:
    """A training batch as a recipe's sampling and a stage's resolution make it: square crops
    (``sampling.crop_scale``), resized to ``resolution`` of the images' size, flipped at random."""
    h, w = images.shape[-2:]
    size = (max(1, round(h * resolution)), max(1, round(w * resolution)))
    if sampling.crop_scale != (1.0, 1.0):
        images = square_crops(images, sampling.crop_scale, size, shard)
    elif size != (h, w):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    if sampling.flip:
        flip = (shard.rand(images.shape[0]) < 0.5).to(images.device).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
    return images
