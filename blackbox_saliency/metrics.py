"""The paper's measures of a saliency mask: boxes, weakly supervised localisation, and the
saliency metric ``s = log(max(a, 0.05)) - log(p)`` (section 3.2).

Boxes are ``x0, y0, x1, y1`` in pixels, inclusive (the convention of ImageNet's and Tiny
ImageNet's annotations): a box covering a whole ``H x W`` image is ``0, 0, W-1, H-1``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ._validation import check_class_ids, check_images

__all__ = ["tightest_box", "box_area", "box_iou", "localisation_error", "saliency_metric"]


def _check_masks(masks: object) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor) or masks.dim() != 4 or masks.shape[1] != 1:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks: expected a tensor of shape (N, 1, H, W), got {got}")
    return masks


def tightest_box(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The tightest box around the pixels above ``threshold`` in each mask, ``(N, 4)`` int64.

    A mask with no pixel above the threshold gives the whole image (the protocol needs a box
    for every image, and the whole image is the "max box" baseline).

    Example:
        >>> m = torch.zeros(1, 1, 8, 8); m[0, 0, 2:4, 3:6] = 1
        >>> tightest_box(m).tolist()
        [[3, 2, 5, 3]]
    """
    above = _check_masks(masks)[:, 0] > threshold
    _, height, width = above.shape
    rows, cols = above.any(2), above.any(1)
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    big = max(height, width)
    boxes = torch.stack([
        torch.where(cols, xs, big).amin(1), torch.where(rows, ys, big).amin(1),
        torch.where(cols, xs, -1).amax(1), torch.where(rows, ys, -1).amax(1),
    ], dim=1)
    empty = ~rows.any(1)
    boxes[empty] = torch.tensor([0, 0, width - 1, height - 1], device=masks.device)
    return boxes.long()


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Pixels inside inclusive boxes ``(N, 4)``."""
    return ((boxes[:, 2] - boxes[:, 0] + 1).clamp(min=0) * (boxes[:, 3] - boxes[:, 1] + 1).clamp(min=0)).float()


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU between every box of ``a (N, 4)`` and every box of ``b (M, 4)``: ``(N, M)``."""
    x0 = torch.maximum(a[:, None, 0], b[None, :, 0])
    y0 = torch.maximum(a[:, None, 1], b[None, :, 1])
    x1 = torch.minimum(a[:, None, 2], b[None, :, 2])
    y1 = torch.minimum(a[:, None, 3], b[None, :, 3])
    inter = ((x1 - x0 + 1).clamp(min=0) * (y1 - y0 + 1).clamp(min=0)).float()
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


def localisation_error(
    masks: torch.Tensor, gt_boxes: Sequence[torch.Tensor], threshold: float = 0.5, iou: float = 0.5,
    return_hits: bool = False,
) -> float | tuple[float, torch.Tensor]:
    """The weakly supervised localisation protocol: a mask's tightest box is correct when its
    IoU with any ground-truth box of its image is above ``iou``. Returns the error rate (and
    the per-image hits with ``return_hits=True``)."""
    boxes = tightest_box(masks, threshold)
    if len(gt_boxes) != boxes.shape[0]:
        raise ValueError(f"gt_boxes: got {len(gt_boxes)} entries for {boxes.shape[0]} masks")
    hits = torch.zeros(boxes.shape[0], dtype=torch.bool)
    for i, gt in enumerate(gt_boxes):
        gt = torch.as_tensor(gt)
        if gt.numel() % 4 or (gt.dim() == 2 and gt.shape[1] != 4):
            raise ValueError(f"gt_boxes: entry {i} must be (k, 4) boxes x0, y0, x1, y1, got shape {tuple(gt.shape)}")
        gt = gt.reshape(-1, 4).to(boxes.device)
        hits[i] = bool(gt.numel()) and bool((box_iou(boxes[i : i + 1], gt) > iou).any())
    error = 1.0 - hits.float().mean().item()
    return (error, hits) if return_hits else error


def saliency_metric(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    masks: torch.Tensor | None,
    class_ids: torch.Tensor,
    threshold: float = 0.5,
    area_floor: float = 0.05,
    boxes: torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """The paper's saliency metric per image, ``(N,)``; lower is better.

    Crops each image to the tightest box around ``masks > threshold`` (or to ``boxes``),
    resizes the crop to the image size disregarding the aspect ratio (bilinear), and takes
    ``p``, the classifier's softmax probability of the class on it, and ``a``, the box's share
    of the image: ``s = log(max(a, area_floor)) - log(p)``. The full-image box gives
    ``-log p`` of the plain image.
    """
    if (masks is None) == (boxes is None):
        raise ValueError("masks: give exactly one of masks or boxes")
    images = check_images(images)
    n, _, height, width = images.shape
    if masks is not None and (_check_masks(masks).shape[0] != n or masks.shape[-2:] != images.shape[-2:]):
        raise ValueError(f"masks: expected shape ({n}, 1, {height}, {width}), got {tuple(masks.shape)}")
    boxes = tightest_box(masks, threshold) if boxes is None else torch.as_tensor(boxes).reshape(-1, 4)
    if boxes.shape[0] != n:
        raise ValueError(f"boxes: got {boxes.shape[0]} for {n} images")
    boxes = boxes.to(images.device).float()
    area = box_area(boxes) / (height * width)
    ids = check_class_ids(class_ids, n, None).to(images.device)
    scores = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            chunk = boxes[i : i + batch_size]
            # roi_align samples the box's continuous extent [x0, x1 + 1) onto the full grid
            rois = torch.cat([torch.arange(len(chunk), device=images.device, dtype=chunk.dtype)[:, None],
                              chunk[:, :2], chunk[:, 2:] + 1], dim=1)
            # one sample at each output pixel's centre: the identity crop returns the image
            # exactly, any other box is plain bilinear resizing (two samples per pixel would
            # average neighbours and blur even the full-image box)
            crops = roi_align(images[i : i + batch_size], rois, output_size=(height, width), spatial_scale=1.0,
                              sampling_ratio=1, aligned=True)
            log_p = F.log_softmax(classifier(crops).float(), dim=1).gather(1, ids[i : i + batch_size, None]).squeeze(1)
            scores.append(torch.log(area[i : i + batch_size].clamp(min=area_floor)) - log_p)
    return torch.cat(scores)
