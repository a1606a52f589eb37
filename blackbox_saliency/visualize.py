"""Pictures of masks, with Pillow only: the mask over the image, the preserved and the removed
image side by side."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw

from .evidence import blur_sigma_for, gaussian_blur

__all__ = ["denormalize", "overlay", "saliency_panel", "to_pil"]


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize(mean, std)``: back to pixel values in ``[0, 1]``."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` tensor in ``[0, 1]`` as a PIL image."""
    array = (image.detach().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def overlay(image: torch.Tensor, mask: torch.Tensor, colour: Sequence[float] = (1.0, 0.15, 0.1), strength: float = 0.6) -> torch.Tensor:
    """The image dimmed where the mask is 0, tinted with ``colour`` where it is 1.

    Args:
        image: ``(3, H, W)`` pixels in ``[0, 1]``.
        mask: ``(1, H, W)`` in ``[0, 1]``.
    """
    tint = torch.as_tensor(colour, dtype=image.dtype).view(3, 1, 1)
    base = image * (0.45 + 0.55 * mask)
    return (base * (1 - strength * mask) + tint * strength * mask).clamp(0, 1)


def saliency_panel(image: torch.Tensor, mask: torch.Tensor, title: str | None = None) -> Image.Image:
    """One picture: overlay | preserved (``Phi(X, M)``) | removed (``Phi(X, 1 - M)``), with the
    blurred image as the alternative so that the picture is the same every time."""
    blurred = gaussian_blur(image.unsqueeze(0), blur_sigma_for(*image.shape[-2:]))[0]
    tiles = [overlay(image, mask), image * mask + blurred * (1 - mask), image * (1 - mask) + blurred * mask]
    height, width = image.shape[-2:]
    top = 22 if title else 0
    panel = Image.new("RGB", (3 * width + 8, height + top), "white")
    for i, tile in enumerate(tiles):
        panel.paste(to_pil(tile), (i * (width + 4), top))
    if title:
        ImageDraw.Draw(panel).text((4, 4), title, fill="black")
    return panel
