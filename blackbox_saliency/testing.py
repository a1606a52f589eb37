"""A planted-evidence task whose right answer is known, for tests and sanity checks.

Images are smooth random backgrounds with one of a few high-frequency patterns pasted at a
random place; :class:`PatternClassifier` is a hand-built matched filter that names the pattern
and sees nothing else. A good explainer's mask covers the pasted patch for the true class and
stays empty for a class whose pattern is absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

__all__ = ["planted_patterns", "PlantedPatterns", "PatternClassifier", "mask_boxes", "box_iou"]


def planted_patterns(patch: int = 8) -> torch.Tensor:
    """Four zero-mean +-1 patterns ``(4, patch, patch)``: checkerboard, horizontal stripes,
    vertical stripes, and 2x2 checks. They are mutually orthogonal."""
    i = torch.arange(patch).view(-1, 1)
    j = torch.arange(patch).view(1, -1)
    patterns = torch.stack([
        ((i + j) % 2) * 2 - 1,
        (i % 2).expand(patch, patch) * 2 - 1,
        (j % 2).expand(patch, patch) * 2 - 1,
        ((i // 2 + j // 2) % 2) * 2 - 1,
    ])
    return patterns.float()


class PlantedPatterns(Dataset):
    """``(image (3, size, size), label)`` pairs with pattern ``label`` at a random place.

    ``boxes[i]`` is the pasted patch as ``x0, y0, x1, y1`` (inclusive pixels). Deterministic for
    a given ``seed``; images are roughly zero-mean with std about 0.5.

    Example:
        >>> data = PlantedPatterns(8, seed=0)
        >>> image, label = data[0]; tuple(image.shape), 0 <= label < 4
        ((3, 32, 32), True)
    """

    def __init__(self, n: int, size: int = 32, patch: int = 8, seed: int = 0, amplitude: float = 0.8):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(n, 3, 4, 4, generator=g) * 0.5
        background = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        xs = torch.randint(0, size - patch + 1, (n,), generator=g)
        ys = torch.randint(0, size - patch + 1, (n,), generator=g)
        patterns = planted_patterns(patch) * amplitude
        images = background.clone()
        for k in range(n):
            y, x = int(ys[k]), int(xs[k])
            images[k, :, y : y + patch, x : x + patch] = background[k, :, y : y + patch, x : x + patch].mean() + patterns[self.labels[k]]
        self.images = images
        self.boxes = torch.stack([xs, ys, xs + patch - 1, ys + patch - 1], dim=1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class PatternClassifier(nn.Module):
    """Matched filter for :func:`planted_patterns`: logit ``k`` is ``scale`` times the strongest
    normalised response of pattern ``k`` anywhere in the image. It sees only the patterns."""

    def __init__(self, patch: int = 8, scale: float = 10.0):
        super().__init__()
        weight = planted_patterns(patch).unsqueeze(1).repeat(1, 3, 1, 1) / (3 * patch * patch)
        self.register_buffer("weight", weight)
        self.scale = scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        response = F.conv2d(images, self.weight.to(images.dtype))
        return self.scale * response.flatten(2).amax(2)



def mask_boxes(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """:func:`blackbox_saliency.metrics.tightest_box`."""
    from .metrics import tightest_box

    return tightest_box(masks, threshold)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``(N, 4)`` inclusive-pixel box tensors."""
    from .metrics import box_iou as pairwise

    return pairwise(a, b).diagonal()
