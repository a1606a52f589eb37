"""Pictures of masks, with Pillow only: the mask over the image, the preserved and the removed
image side by side, and a heatmap over the image in the style of pytorch-grad-cam's
``show_cam_on_image``."""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .evidence import blur_sigma_for, gaussian_blur

__all__ = ["denormalize", "overlay", "saliency_panel", "show_mask_on_image", "to_pil", "COLORMAPS"]


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


# Colormaps as piecewise-linear (position, value) anchors per channel, matplotlib's definitions.
_SEGMENTS = {
    "jet": (
        ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
    ),
    "hot": (
        ((0.0, 0.0416), (0.365079, 1.0), (1.0, 1.0)),
        ((0.0, 0.0), (0.365079, 0.0), (0.746032, 1.0), (1.0, 1.0)),
        ((0.0, 0.0), (0.746032, 0.0), (1.0, 1.0)),
    ),
    "gray": (((0.0, 0.0), (1.0, 1.0)),) * 3,
}
#: The colormaps built in (no matplotlib needed); with matplotlib installed, any of its names works too.
COLORMAPS = tuple(_SEGMENTS)

Colormap = Union[str, Callable[[np.ndarray], np.ndarray]]


def _colormap(colormap: Colormap) -> Callable[[np.ndarray], np.ndarray]:
    """A function from values ``(H, W)`` in ``[0, 1]`` to colours ``(H, W, 3 or 4)`` in ``[0, 1]``."""
    if callable(colormap):
        return colormap
    if not isinstance(colormap, str):
        raise TypeError(f"colormap: expected a name or a callable, got {type(colormap).__name__}")
    if colormap in _SEGMENTS:
        segments = _SEGMENTS[colormap]
        return lambda v: np.stack([np.interp(v, *zip(*channel)) for channel in segments], axis=-1)
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            f"colormap: {colormap!r} is not built in (built in: {', '.join(COLORMAPS)}); install matplotlib for "
            "its colormaps, or pass a callable"
        ) from None
    try:
        return matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(f"colormap: {colormap!r} is neither built in ({', '.join(COLORMAPS)}) nor a matplotlib colormap") from None


def _image_array(image: object) -> np.ndarray:
    """``image`` as float32 ``(H, W, 3)`` in ``[0, 1]``."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(f"image: expected a tensor (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
        array = tensor.permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            hint = " (numpy images are (H, W, C): for (C, H, W) use image.transpose(1, 2, 0))" if array.ndim == 3 else ""
            raise ValueError(f"image: expected an array (H, W, 3), (H, W, 4) or (H, W), got shape {image.shape}{hint}")
        array = array[..., :3]
    else:
        raise TypeError(f"image: expected a numpy array, a PIL image or a tensor, got {type(image).__name__}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("image: contains NaN or infinite values")
        if array.size and (array.min() < -1e-4 or array.max() > 1 + 1e-4):
            raise ValueError(
                f"image: float pixels must be in [0, 1], got {array.min():.3g} to {array.max():.3g}; a normalised "
                "image goes back with denormalize(image, mean, std)"
            )
        array = array.clip(0, 1)
    else:
        raise TypeError(f"image: expected uint8 or float pixels in [0, 1], got {array.dtype}")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _mask_array(mask: object, size: tuple[int, int]) -> np.ndarray:
    """``mask`` as float32 ``(H, W)`` in ``[0, 1]`` at ``size``, resized bilinearly when it differs."""
    if isinstance(mask, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(mask))
        if tensor.dim() == 3 and tensor.shape[-1] == 1:  # (H, W, 1)
            tensor = tensor[..., 0]
    elif isinstance(mask, torch.Tensor):
        tensor = mask.detach().cpu()
    else:
        raise TypeError(f"mask: expected a tensor or a numpy array, got {type(mask).__name__}")
    shape = tuple(mask.shape)
    while tensor.dim() > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2:
        raise ValueError(f"mask: expected shape (H, W) or (1, H, W), got {shape}")
    if tensor.dtype == torch.bool:
        tensor = tensor.float()
    if not tensor.is_floating_point():
        raise TypeError(f"mask: expected float values in [0, 1], got {tensor.dtype}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError("mask: contains NaN or infinite values")
    if tensor.numel() and (tensor.min() < -1e-4 or tensor.max() > 1 + 1e-4):
        raise ValueError(
            f"mask: values must be in [0, 1], got {tensor.min().item():.3g} to {tensor.max().item():.3g}; rescale "
            "it first, e.g. (m - m.min()) / (m.max() - m.min())"
        )
    if tuple(tensor.shape) != size:
        tensor = F.interpolate(tensor[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return tensor.clamp(0, 1).numpy()


def show_mask_on_image(image: object, mask: object, colormap: Colormap = "jet", alpha: float = 0.5) -> Image.Image:
    """The mask as a heatmap blended over the image, like pytorch-grad-cam's ``show_cam_on_image``.

    Args:
        image: the picture in plain pixels: a numpy array ``(H, W, 3)`` (or ``(H, W)``, or
            ``(H, W, 4)`` whose alpha is dropped) of floats in ``[0, 1]`` or uint8, a PIL image,
            or a tensor ``(3, H, W)`` in ``[0, 1]``. A normalised tensor goes back to pixels with
            :func:`denormalize` first.
        mask: ``(H, W)`` or ``(1, H, W)`` in ``[0, 1]``, a tensor (e.g. ``masks[i]`` from
            :func:`~blackbox_saliency.explain`) or a numpy array; resized bilinearly to the
            image when the sizes differ.
        colormap: ``"jet"`` (as pytorch-grad-cam), ``"hot"`` or ``"gray"`` built in; with
            matplotlib installed, any of its names (``"viridis"``, ``"turbo"``, ...); or a
            callable from values ``(H, W)`` in ``[0, 1]`` to colours ``(H, W, 3 or 4)`` in ``[0, 1]``.
        alpha: weight of the heatmap: ``0`` is the image alone, ``1`` the heatmap alone.

    Returns:
        An RGB PIL image of the image's size (``numpy.asarray(result)`` is pytorch-grad-cam's
        uint8 ``(H, W, 3)`` array).

    Example:
        >>> picture = show_mask_on_image(np.zeros((4, 4, 3)), torch.ones(1, 2, 2), alpha=0.5)
        >>> picture.size, picture.getpixel((0, 0))
        ((4, 4), (64, 0, 0))
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    cmap = _colormap(colormap)
    pixels = _image_array(image)
    values = _mask_array(mask, pixels.shape[:2])
    heat = np.asarray(cmap(values), dtype=np.float32)
    if heat.shape[:2] != values.shape or heat.ndim != 3 or heat.shape[-1] not in (3, 4):
        raise ValueError(f"colormap: must map values (H, W) to colours (H, W, 3 or 4), returned shape {heat.shape}")
    blended = (1 - alpha) * pixels + alpha * heat[..., :3].clip(0, 1)
    return Image.fromarray((blended * 255).round().astype(np.uint8), "RGB")
