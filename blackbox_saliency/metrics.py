"""The paper's measures of a saliency mask: boxes, weakly supervised localisation, and the
saliency metric ``s = log(max(a, 0.05)) - log(p)`` (section 3.2); and, from other papers, the
faithfulness measures deletion and insertion AUC (Petsiuk et al. 2018) and the pointing game
(Zhang et al. 2016).

Boxes are ``x0, y0, x1, y1`` in pixels, inclusive (the convention of ImageNet's and Tiny
ImageNet's annotations): a box covering a whole ``H x W`` image is ``0, 0, W-1, H-1``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import roi_align

from ._blackbox import frozen
from ._validation import check_class_ids, check_classifier, check_images, check_logits
from .evidence import blur_sigma_for, gaussian_blur

__all__ = ["tightest_box", "box_area", "box_iou", "localisation_error", "saliency_metric", "deletion_auc",
           "insertion_auc", "pointing_game"]


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


def _continuous(boxes: torch.Tensor) -> torch.Tensor:
    """Inclusive pixel boxes ``x0, y0, x1, y1`` as the continuous boxes torchvision.ops measures."""
    return boxes.float() + boxes.new_tensor([0, 0, 1, 1], dtype=torch.float32)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Pixels inside inclusive boxes ``(N, 4)``."""
    return torchvision.ops.box_area(_continuous(boxes))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU between every inclusive-pixel box of ``a (N, 4)`` and every one of ``b (M, 4)``: ``(N, M)``."""
    return torchvision.ops.box_iou(_continuous(a), _continuous(b))


def _gt_box_list(gt_boxes: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """One ``(k, 4)`` tensor of ground-truth boxes per image (``k`` may be 0), or a clear error."""
    if len(gt_boxes) != n:
        raise ValueError(f"gt_boxes: got {len(gt_boxes)} entries for {n} masks")
    out = []
    for i, gt in enumerate(gt_boxes):
        gt = torch.as_tensor(gt)
        if gt.numel() % 4 or (gt.dim() == 2 and gt.shape[1] != 4):
            raise ValueError(f"gt_boxes: entry {i} must be (k, 4) boxes x0, y0, x1, y1, got shape {tuple(gt.shape)}")
        out.append(gt.reshape(-1, 4))
    return out


def localisation_error(
    masks: torch.Tensor, gt_boxes: Sequence[torch.Tensor], threshold: float = 0.5, iou: float = 0.5,
    return_hits: bool = False,
) -> float | tuple[float, torch.Tensor]:
    """The weakly supervised localisation protocol: a mask's tightest box is correct when its
    IoU with any ground-truth box of its image is above ``iou``. Returns the error rate (and
    the per-image hits with ``return_hits=True``)."""
    boxes = tightest_box(masks, threshold)
    hits = torch.zeros(boxes.shape[0], dtype=torch.bool)
    for i, gt in enumerate(_gt_box_list(gt_boxes, boxes.shape[0])):
        gt = gt.to(boxes.device)
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


def _check_maps(masks: object, images: torch.Tensor) -> torch.Tensor:
    """Saliency maps ``(N, 1, H, W)`` of real, finite values matching ``images``."""
    masks = _check_masks(masks)
    n, _, height, width = images.shape
    if masks.shape[0] != n or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"masks: expected shape ({n}, 1, {height}, {width}) to match images, got {tuple(masks.shape)} (resize "
            "smaller maps first, e.g. with torch.nn.functional.interpolate)"
        )
    if masks.is_complex():
        raise TypeError(f"masks: expected real values, got {masks.dtype}")
    if not bool(torch.isfinite(masks).all()):
        raise ValueError("masks: contains NaN or infinite values")
    return masks


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _removal_curves(
    classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, masks: torch.Tensor,
    class_ids, steps: int, batch_size: int, blur_sigma: float | None, insertion: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The class probability after each of ``steps`` removals (or insertions), ``(N, steps + 1)``,
    and the share of pixels changed at each point, ``(steps + 1,)``."""
    classifier = check_classifier(classifier)
    images = check_images(images)
    masks = _check_maps(masks, images)
    steps, batch_size = _positive_int(steps, "steps"), _positive_int(batch_size, "batch_size")
    n, _, height, width = images.shape
    ids = check_class_ids(class_ids, n, None).to(images.device)
    if blur_sigma is None:
        blur_sigma = blur_sigma_for(height, width)
    elif isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not 0 <= blur_sigma < float("inf"):
        raise ValueError(f"blur_sigma: expected a finite number >= 0 or None, got {blur_sigma!r}")
    pixels = height * width
    counts = [k * pixels // steps for k in range(steps + 1)]  # pixels changed after step k: equal steps
    curves = torch.empty(n, steps + 1, dtype=torch.float32, device=images.device)
    pending: list[torch.Tensor] = []
    where: list[tuple[int, int]] = []

    def run() -> None:
        logits = check_logits(classifier(torch.cat(pending)), len(pending))
        if int(ids.max()) >= logits.shape[1] or int(ids.min()) < 0:
            check_class_ids(ids.cpu(), n, logits.shape[1])  # raises, naming the id
        rows = torch.tensor([i for i, _ in where], device=images.device)
        cols = torch.tensor([k for _, k in where], device=images.device)
        probs = logits.float().softmax(1).gather(1, ids[rows, None]).squeeze(1)
        curves[rows, cols] = probs.to(curves.device)
        pending.clear()
        where.clear()

    with torch.no_grad(), frozen(classifier):
        for i in range(n):
            image = images[i : i + 1]
            blurred = gaussian_blur(image, blur_sigma)
            start, end = (blurred, image) if insertion else (image, blurred)
            # rank of each pixel in order of decreasing saliency; ties in raster order (stable sort)
            order = torch.sort(masks[i].reshape(-1).float(), descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank[order] = torch.arange(pixels, device=order.device)
            rank = rank.view(1, 1, height, width).to(images.device)
            for k, count in enumerate(counts):
                pending.append(torch.where(rank < count, end, start))
                where.append((i, k))
                if len(pending) == batch_size:
                    run()
        if pending:
            run()
    fractions = torch.tensor(counts, dtype=torch.float32, device=images.device) / pixels
    return curves, fractions


def deletion_auc(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    masks: torch.Tensor,
    class_ids,
    steps: int = 32,
    batch_size: int = 64,
    blur_sigma: float | None = None,
    return_curves: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Deletion AUC (Petsiuk et al. 2018, RISE) per image, ``(N,)``; **lower is more faithful**.

    Starting from the image, the pixels are replaced by those of the blurred image (the paper's
    removed state: :func:`~blackbox_saliency.evidence.gaussian_blur` at
    :func:`~blackbox_saliency.evidence.blur_sigma_for` ``(H, W)``, sigma 10 at 224 px, unless
    ``blur_sigma`` is given) in order of decreasing saliency, in ``steps`` equal steps: after step
    ``k`` the first ``n_k = floor(k * H * W / steps)`` pixels are removed (all channels), so
    ``n_0 = 0`` is the image and ``n_steps = H * W`` the blurred image. ``p_k`` is the classifier's
    softmax probability of the class there, and the AUC is the trapezoid rule over
    ``x_k = n_k / (H * W)`` in ``[0, 1]``: ``sum_k (x_{k+1} - x_k) (p_k + p_{k+1}) / 2``, which is
    ``(p_0 / 2 + p_1 + ... + p_{steps-1} + p_steps / 2) / steps`` when ``steps`` divides ``H * W``.

    ``masks``: ``(N, 1, H, W)`` at the images' size; only the order of the values counts, so any
    real-valued saliency map will do. Ties are broken in raster order (row by row, left to right,
    a stable sort), so the result is deterministic. ``class_ids``: an int, a list or an ``(N,)``
    tensor. The classifier runs in eval mode, without gradients, on at most ``batch_size``
    images at a time (the ``N * (steps + 1)`` curve images are never all in memory at once).
    ``return_curves=True`` also returns the curves ``p_k``, ``(N, steps + 1)``.

    Example:
        >>> reader = lambda x: torch.stack([20 * x[:, 0, 0, 0], torch.zeros(len(x))], 1)  # class 0 reads pixel (0, 0)
        >>> images = torch.zeros(1, 3, 8, 8); images[0, 0, 0, 0] = 1
        >>> right = images[:, :1]  # pixel (0, 0) first
        >>> good, bad = (deletion_auc(reader, images, m, 0, blur_sigma=2) for m in (right, 1 - right))
        >>> bool(good < bad)
        True
    """
    curves, x = _removal_curves(classifier, images, masks, class_ids, steps, batch_size, blur_sigma, insertion=False)
    auc = torch.trapezoid(curves, x, dim=1)
    return (auc, curves) if return_curves else auc


def insertion_auc(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    masks: torch.Tensor,
    class_ids,
    steps: int = 32,
    batch_size: int = 64,
    blur_sigma: float | None = None,
    return_curves: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Insertion AUC (Petsiuk et al. 2018, RISE) per image, ``(N,)``; **higher is more faithful**.

    The mirror of :func:`deletion_auc`: starting from the blurred image, the original pixels are
    put back in order of decreasing saliency in ``steps`` equal steps (after step ``k`` the first
    ``n_k = floor(k * H * W / steps)`` pixels are the image's), and the AUC of the class
    probability is the trapezoid rule over ``x_k = n_k / (H * W)``. Arguments, tie-breaking and
    memory as in :func:`deletion_auc`.
    """
    curves, x = _removal_curves(classifier, images, masks, class_ids, steps, batch_size, blur_sigma, insertion=True)
    auc = torch.trapezoid(curves, x, dim=1)
    return (auc, curves) if return_curves else auc


def pointing_game(
    masks: torch.Tensor, gt_boxes: Sequence[torch.Tensor], tolerance: float = 15, return_hits: bool = False,
) -> float | tuple[float, torch.Tensor]:
    """The pointing game (Zhang et al. 2016) with TorchRay's tolerance: a map scores a hit when
    its maximum point is within ``tolerance`` pixels of a ground-truth box of its image. Returns
    the accuracy, the share of hits (and the per-image hits, a bool ``(N,)`` tensor, with
    ``return_hits=True``).

    ``masks``: ``(N, 1, H, W)`` maps of any real values, in the boxes' pixel coordinates;
    ``gt_boxes``: as for :func:`localisation_error`, one ``(k, 4)`` tensor of inclusive boxes
    ``x0, y0, x1, y1`` per image (an image without boxes is a miss). The maximum point is the
    first maximum in raster order (row by row, left to right, as ``torch.argmax`` over the
    flattened map in TorchRay's benchmark), so a flat map points at its top-left pixel and a box
    mask at the box's top-left corner. A hit is a point inside a box, or at a Euclidean distance
    below ``tolerance`` from a pixel of one (``d < tolerance``, strict, as TorchRay; for
    ``tolerance >= 1`` the two agree, and ``tolerance=0`` counts only points inside a box).

    Example:
        >>> m = torch.zeros(1, 1, 32, 32); m[0, 0, 5, 19] = 1  # the point (x=19, y=5)
        >>> pointing_game(m, [torch.tensor([[0, 0, 9, 9]])], tolerance=10)  # 10 px right of the box
        0.0
        >>> pointing_game(m, [torch.tensor([[0, 0, 9, 9]])], tolerance=11)
        1.0
    """
    masks = _check_masks(masks)
    if masks.is_complex():
        raise TypeError(f"masks: expected real values, got {masks.dtype}")
    if not bool(torch.isfinite(masks).all()):
        raise ValueError("masks: contains NaN or infinite values")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
        raise ValueError(f"tolerance: expected a finite number of pixels >= 0, got {tolerance!r}")
    n, _, _, width = masks.shape
    flat = masks.detach().reshape(n, -1)
    index = torch.arange(flat.shape[1], device=flat.device)
    first_max = torch.where(flat == flat.amax(1, keepdim=True), index, flat.shape[1]).amin(1).cpu()
    points_x, points_y = (first_max % width).double(), (first_max // width).double()
    hits = torch.zeros(n, dtype=torch.bool)
    for i, gt in enumerate(_gt_box_list(gt_boxes, n)):
        gt = gt.detach().cpu().double()
        if ((gt[:, 2] < gt[:, 0]) | (gt[:, 3] < gt[:, 1])).any():
            raise ValueError(f"gt_boxes: entry {i} has a box with x1 < x0 or y1 < y0: {gt.tolist()}")
        # distance from the point to the nearest pixel of each box (0 inside)
        dx = torch.maximum(gt[:, 0] - points_x[i], points_x[i] - gt[:, 2]).clamp(min=0)
        dy = torch.maximum(gt[:, 1] - points_y[i], points_y[i] - gt[:, 3]).clamp(min=0)
        d2 = dx**2 + dy**2
        hits[i] = bool(((d2 == 0) | (d2 < float(tolerance) ** 2)).any())
    accuracy = hits.float().mean().item()
    return (accuracy, hits) if return_hits else accuracy
