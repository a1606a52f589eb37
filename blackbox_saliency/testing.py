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

__all__ = ["planted_patterns", "PlantedPatterns", "PatternClassifier", "PatternCNN", "train_pattern_cnn", "mask_boxes",
           "box_iou", "inside_boxes"]


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

    def __init__(self, n: int, size: int = 32, patch: int = 8, seed: int = 0, amplitude: float = 0.8,
                 noise: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(n, 3, 4, 4, generator=g) * 0.5
        background = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        if noise:  # pixel noise: a textured background the patterns must be told apart from
            background = background + noise * torch.randn(n, 3, size, size, generator=g)
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



class PatternCNN(nn.Module):
    """A small learned classifier for :class:`PlantedPatterns`: three 3x3 conv layers and a
    global max pool, so its answer rests on where a pattern is found (trained with
    :func:`train_pattern_cnn`; unlike :class:`PatternClassifier` it is not built by hand)."""

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, num_classes, 3, padding=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).flatten(2).amax(2)


def train_pattern_cnn(data: PlantedPatterns, steps: int = 400, batch_size: int = 64, seed: int = 0) -> PatternCNN:
    """Train a :class:`PatternCNN` on ``data`` with Adam (a few seconds on a CPU); eval mode."""
    torch.manual_seed(seed)
    model = PatternCNN(num_classes=int(data.labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch_size,), generator=g)
        loss = F.cross_entropy(model(data.images[rows]), data.labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def mask_boxes(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """:func:`blackbox_saliency.metrics.tightest_box`."""
    from .metrics import tightest_box

    return tightest_box(masks, threshold)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``(N, 4)`` inclusive-pixel box tensors."""
    from .metrics import box_iou as pairwise

    return pairwise(a, b).diagonal()


def inside_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 1, H, W)`` booleans, true inside each row's inclusive-pixel box ``x0, y0, x1, y1``."""
    ys = torch.arange(height).view(1, -1, 1)
    xs = torch.arange(width).view(1, 1, -1)
    b = boxes.view(-1, 4, 1, 1)
    return ((xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])).unsqueeze(1)
