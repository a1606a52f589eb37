"""The iterative baseline: optimise the saliency objective for each image directly.

This is the slow method the paper compares against (hundreds of classifier passes per image).
It needs no trained explainer, so :func:`blackbox_saliency.explain` falls back to it.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from ._blackbox import frozen
from .objective import SaliencyObjective

__all__ = ["optimize_masks"]


def optimize_masks(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    class_ids: torch.Tensor,
    objective: SaliencyObjective | None = None,
    steps: int = 300,
    lr: float = 0.1,
    mask_size: int | None = None,
) -> torch.Tensor:
    """Masks ``(N, 1, H, W)`` found by Adam on per-image mask logits at low resolution.

    The mask lives at ``mask_size`` pixels on its short side (default ``max(8, H / 8)``: 28 at
    224 px) and is upsampled bilinearly, which keeps it smooth. Every image in the batch is
    optimised at once; gradients reach only the masks, never the classifier's weights. A
    warning says how many masks came out (nearly) empty or full (mean below 0.01 or above 0.99).

    Example:
        >>> clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
        >>> optimize_masks(clf, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), steps=2).shape
        torch.Size([2, 1, 16, 16])
    """
    objective = objective or SaliencyObjective()
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    height, width = images.shape[-2:]
    short = mask_size or max(8, math.ceil(min(height, width) / 8))
    low_size = (max(1, round(short * height / min(height, width))), max(1, round(short * width / min(height, width))))
    logits = torch.zeros(images.shape[0], 1, *low_size, device=images.device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    images = images.detach()
    class_ids = class_ids.to(images.device)
    with frozen(classifier), torch.enable_grad():
        for _ in range(steps):
            low_res = torch.sigmoid(logits)
            masks = F.interpolate(low_res, size=(height, width), mode="bilinear", align_corners=False)
            loss, _ = objective(classifier, images, masks, class_ids, low_res_masks=low_res)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
    with torch.no_grad():
        masks = F.interpolate(torch.sigmoid(logits), size=(height, width), mode="bilinear", align_corners=False)
    _warn_if_degenerate(masks, steps, lr)
    return masks


def _warn_if_degenerate(masks: torch.Tensor, steps: int, lr: float) -> None:
    """One warning for the masks that say nothing about where the evidence is: (nearly) empty,
    mean below 0.01, or (nearly) full, mean above 0.99."""
    area = masks.flatten(1).mean(1)
    empty, full = int((area < 0.01).sum()), int((area > 0.99).sum())
    if not (empty or full):
        return
    found = " and ".join(f"{kind} for {count} of {len(area)} images" for kind, count in
                         (("empty (mean mask < 0.01)", empty), ("full (mean mask > 0.99)", full)) if count)
    warnings.warn(
        f"optimize_masks: the masks came out {found}; such a mask says nothing about where the evidence is. "
        f"Try more steps (got {steps}), a different lr (got {lr}), or the objective's area_weight (lower for "
        "empty masks, higher for full ones; docs/objective.md). A classifier that ignores the image also "
        "gives empty masks.",
        stacklevel=3,
    )
