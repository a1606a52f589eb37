"""Evidence removal: ``Phi(X, M) = X * M + A * (1 - M)`` (the paper's eq. 6).

The alternative image ``A`` is drawn afresh on every call so that the masking model cannot
adapt to one removal scheme (paper, section 4.1): half of the images get a strong Gaussian
blur of themselves, the others a random constant colour plus Gaussian noise.

Images arrive in the classifier's own input space (already normalised, any mean and std), so
colours and noise are scaled by each channel's statistics over the batch instead of assuming a
``[0, 1]`` or ``[-1, 1]`` range. With images in ``[-1, 1]`` (std about 0.5) the defaults give
colours within about +-0.33 and noise of std 0.1, as in the authors' code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._distributed import LOCAL, BatchShard

__all__ = ["blur_sigma_for", "gaussian_blur", "random_colour_noise", "alternative_image", "remove_evidence"]

#: Blur strength from the paper: sigma 10 at 224 px, scaled with the image size.
BLUR_SIGMA_AT_224 = 10.0


def blur_sigma_for(height: int, width: int) -> float:
    """The paper's blur sigma (10 at 224 px) scaled to an image of this size."""
    return BLUR_SIGMA_AT_224 * min(height, width) / 224.0


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(N, C, H, W)`` images with reflect padding, as two 1-D passes.

    The same result as ``torchvision``'s ``gaussian_blur`` (which convolves with the full 2-D
    kernel): at the paper's sigma of 10 on 224 px images the kernel is 61 wide, and two 1-D
    passes cost 122 multiply-adds a pixel instead of 3,721. The kernel covers three sigmas but
    never more than the image (reflect padding needs the padding to be smaller than the image).
    """
    height, width = images.shape[-2:]
    radius = min(int(math.ceil(3.0 * sigma)), height - 1, width - 1)
    if radius < 1 or sigma <= 0:
        return images
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c, dtype = images.shape[1], images.dtype
    # In float32 and the default memory layout, outside autocast: on the CPU this grouped
    # convolution in bf16 on channels-last images takes a path thousands of times slower
    # (measured: over two minutes for 8 images of 128 px, against 40 ms).
    with torch.autocast(images.device.type, enabled=False):
        padded = F.pad(images.float().contiguous(), (radius, radius, radius, radius), mode="reflect")
        rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        blurred = F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return blurred.to(dtype)


def random_colour_noise(
    images: torch.Tensor, colour_scale: float = 0.66, noise_scale: float = 0.2, *, shard: BatchShard = LOCAL
) -> torch.Tensor:
    """A random constant colour per image plus Gaussian noise, in the images' own space.

    Each channel's colour is ``mean + U(-1, 1) * colour_scale * std`` and the noise has std
    ``noise_scale * std``, with mean and std of that channel over the batch (over the whole
    batch across processes when ``shard`` is one process's share of it, in distributed training).
    """
    mean, std = shard.channel_stats(images)
    n, c = images.shape[:2]
    colour = mean + (shard.rand(n, c, 1, 1, device=images.device, dtype=images.dtype) * 2 - 1) * colour_scale * std
    noise = shard.randn(n, *images.shape[1:], device=images.device, dtype=images.dtype) * noise_scale * std
    return colour + noise


def alternative_image(images: torch.Tensor, blur_prob: float = 0.5, blur_sigma: float | None = None, *,
                      shard: BatchShard = LOCAL) -> torch.Tensor:
    """Draw the alternative image ``A`` for each image: blur with probability ``blur_prob``,
    otherwise a random colour with noise. ``blur_sigma=None`` uses the paper's, scaled.
    ``shard``: in distributed training, this process's share of the batch; the draws are then
    those one process would make for the whole batch."""
    images = images.detach()
    if blur_sigma is None:
        blur_sigma = blur_sigma_for(*images.shape[-2:])
    use_blur = shard.rand(images.shape[0], 1, 1, 1, device=images.device) < blur_prob
    return torch.where(use_blur, gaussian_blur(images, blur_sigma), random_colour_noise(images, shard=shard))


def remove_evidence(
    images: torch.Tensor, masks: torch.Tensor, alternative: torch.Tensor | None = None
) -> torch.Tensor:
    """``Phi(X, M)``: keep the images where ``masks`` is 1, replace them by ``alternative``
    where it is 0. ``alternative=None`` draws a fresh one with :func:`alternative_image`.

    Example:
        >>> x = torch.randn(2, 3, 32, 32); m = torch.zeros(2, 1, 32, 32)
        >>> a = torch.zeros_like(x)
        >>> bool((remove_evidence(x, m, a) == 0).all())
        True
    """
    if alternative is None:
        alternative = alternative_image(images)
    return images * masks + alternative * (1 - masks)
