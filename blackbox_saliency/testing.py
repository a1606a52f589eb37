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

__all__ = ["planted_patterns", "PlantedPatterns", "PatternClassifier", "PatternCNN", "train_pattern_cnn",
           "train_pattern_vit", "mask_boxes", "paired_box_iou", "inside_boxes"]


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
    normalised response of pattern ``k`` anywhere in the image. It sees only the patterns.

    ``smooth``: ``None`` takes the maximum over positions; a number ``t`` takes
    ``logsumexp(t * response) / t`` instead, which approaches the maximum as ``t`` grows (it
    exceeds it by at most ``log(positions) / t``). The maximum's gradient goes to one position, so
    a rounding difference that moves it (another thread count, another number of processes)
    changes the gradient by order one and training diverges within a few steps (2026-12-06:
    float64, one process on 1 and on 2 threads: 0.17 apart, relative, after four mask steps). The smooth pool has no such jump: use it
    where two runs must agree to rounding (``tests/test_distributed.py``).

    Example:
        >>> data = PlantedPatterns(4, patch=12, seed=0)
        >>> hard, soft = PatternClassifier(patch=12), PatternClassifier(patch=12, smooth=50.0)
        >>> bool((soft(data.images) >= hard(data.images)).all())
        True
    """

    def __init__(self, patch: int = 8, scale: float = 10.0, smooth: float | None = None):
        super().__init__()
        if smooth is not None and (isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not smooth > 0):
            raise ValueError(f"smooth: expected None or a number > 0, got {smooth!r}")
        weight = planted_patterns(patch).unsqueeze(1).repeat(1, 3, 1, 1) / (3 * patch * patch)
        self.register_buffer("weight", weight)
        self.scale = scale
        self.smooth = None if smooth is None else float(smooth)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        response = F.conv2d(images, self.weight.to(images.dtype)).flatten(2)
        if self.smooth is None:
            return self.scale * response.amax(2)
        return self.scale * torch.logsumexp(self.smooth * response, 2) / self.smooth



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
    return _train_classifier(model, data, steps, batch_size, seed, torch.optim.Adam(model.parameters(), lr=3e-3))


def train_pattern_vit(data: PlantedPatterns, steps: int = 300, batch_size: int = 64, seed: int = 0, patch_size: int = 8,
                      depth: int = 2, embed_dim: int = 64, num_heads: int = 2, lr: float = 1e-3,
                      fill_prob: float = 0.0) -> nn.Module:
    """A small timm vision transformer (``vit_tiny_patch16_224``'s design at ``data``'s image size,
    with these sizes; class token, random init) trained on ``data`` with AdamW; eval mode. A
    classifier that is not a CNN, for checking explainers on one.

    ``fill_prob``: the share of training images whose background, outside a random box around the
    pattern, is replaced by what an explainer fills removed evidence with (a blur or a random
    colour with noise), so that the fill itself is no evidence of any class."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=int(data.labels.max()) + 1,
                              img_size=data.images.shape[-1], patch_size=patch_size, depth=depth, embed_dim=embed_dim,
                              num_heads=num_heads)
    augment = (lambda rows, g: _fill_background(data, rows, fill_prob, g)) if fill_prob else None
    return _train_classifier(model, data, steps, batch_size, seed, torch.optim.AdamW(model.parameters(), lr=lr), augment)


def _fill_background(data: PlantedPatterns, rows: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    from .evidence import alternative_image

    images = data.images[rows]
    margin = torch.randint(0, 9, (len(rows), 4), generator=g) * torch.tensor([-1, -1, 1, 1])
    boxes = data.boxes[rows] + margin
    kept = inside_boxes(boxes, *images.shape[-2:]) | (torch.rand(len(rows), 1, 1, 1, generator=g) >= prob)
    return torch.where(kept, images, alternative_image(images))


def _train_classifier(model: nn.Module, data: PlantedPatterns, steps: int, batch_size: int, seed: int,
                      optimizer: torch.optim.Optimizer, augment=None) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch_size,), generator=g)
        images = data.images[rows] if augment is None else augment(rows, g)
        loss = F.cross_entropy(model(images), data.labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def mask_boxes(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """:func:`blackbox_saliency.metrics.tightest_box`."""
    from .metrics import tightest_box

    return tightest_box(masks, threshold)


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N,)``: IoU of row ``i`` of ``a`` with row ``i`` of ``b``, two ``(N, 4)`` inclusive-pixel
    box tensors (:func:`blackbox_saliency.metrics.box_iou` gives every pair, ``(N, M)``)."""
    from .metrics import box_iou

    return box_iou(a, b).diagonal()


def __getattr__(name: str):
    if name == "box_iou":  # the old name of paired_box_iou, easily mistaken for metrics.box_iou
        import warnings

        warnings.warn("blackbox_saliency.testing.box_iou is now paired_box_iou", FutureWarning, stacklevel=2)
        return paired_box_iou
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def inside_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 1, H, W)`` booleans, true inside each row's inclusive-pixel box ``x0, y0, x1, y1``."""
    ys = torch.arange(height).view(1, -1, 1)
    xs = torch.arange(width).view(1, 1, -1)
    b = boxes.view(-1, 4, 1, 1)
    return ((xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])).unsqueeze(1)
