"""Baseline saliency methods, all in ``explain``'s call shape
``(classifier, images, class_ids) -> masks (N, 1, H, W) in [0, 1]``.

Maps that are not masks (gradients, Grad-CAM, Captum attributions) are turned into masks one
documented way, :func:`map_to_mask`, so the box protocol treats every method alike: absolute
value, summed over channels when there are several, then divided by the image's own maximum.
Thresholding at 0.5 then keeps the pixels with at least half of the strongest response.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._blackbox import frozen
from ._validation import check_class_ids, check_images

__all__ = ["map_to_mask", "centre_box", "max_box", "gradient_saliency", "grad_cam", "captum_saliency", "captum_occlusion", "BASELINES"]

Method = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def map_to_mask(saliency: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(N, C, h, w)`` saliency map -> ``(N, 1, H, W)`` mask in ``[0, 1]``: absolute value,
    channel sum, bilinear resize to ``size``, division by each map's maximum."""
    if saliency.dim() == 3:
        saliency = saliency.unsqueeze(1)
    m = saliency.detach().float().abs().sum(1, keepdim=True)
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    peak = m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (m / peak).clamp(0, 1)


def centre_box(classifier, images: torch.Tensor, class_ids=None) -> torch.Tensor:
    """The central rectangle covering half of the image's area (the paper's "Center")."""
    n, _, height, width = images.shape
    side = math.sqrt(0.5)
    h, w = round(height * side), round(width * side)
    y0, x0 = (height - h) // 2, (width - w) // 2
    masks = images.new_zeros(n, 1, height, width)
    masks[..., y0 : y0 + h, x0 : x0 + w] = 1
    return masks


def max_box(classifier, images: torch.Tensor, class_ids=None) -> torch.Tensor:
    """The whole image (the paper's "Max box")."""
    return images.new_ones(images.shape[0], 1, *images.shape[-2:])


def gradient_saliency(classifier, images: torch.Tensor, class_ids) -> torch.Tensor:
    """Simonyan et al. (2013): the gradient of the class logit with respect to the pixels,
    made a mask by :func:`map_to_mask` (they take the maximum over channels; the sum keeps one
    rule for every method)."""
    images = check_images(images)
    ids = check_class_ids(class_ids, images.shape[0], None).to(images.device)
    x = images.detach().clone().requires_grad_(True)
    with frozen(classifier), torch.enable_grad():
        logits = classifier(x)
        (grad,) = torch.autograd.grad(logits.gather(1, ids[:, None]).sum(), x)
    return map_to_mask(grad)


def _last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("classifier: Grad-CAM needs a convolutional layer and found none")
    return convs[-1]


def grad_cam(classifier: nn.Module, images: torch.Tensor, class_ids) -> torch.Tensor:
    """Grad-CAM from the ``grad-cam`` package (pytorch-grad-cam) on the classifier's last
    conv layer, made a mask by :func:`map_to_mask` (it is already non-negative)."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as err:
        raise ImportError("grad_cam needs the grad-cam package: pip install 'blackbox-saliency[bench]'") from err
    ids = check_class_ids(class_ids, images.shape[0], None)
    # the classifier's weights stay frozen, so the graph Grad-CAM needs hangs off the input
    x = images.detach().clone().requires_grad_(True)
    with frozen(classifier), GradCAM(model=classifier, target_layers=[_last_conv(classifier)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in ids])
    return map_to_mask(torch.as_tensor(maps).unsqueeze(1), images.shape[-2:]).to(images.device)


def captum_saliency(classifier, images: torch.Tensor, class_ids) -> torch.Tensor:
    """Captum's ``Saliency`` (absolute input gradients), made a mask by :func:`map_to_mask`."""
    try:
        from captum.attr import Saliency
    except ImportError as err:
        raise ImportError("captum_saliency needs captum: pip install 'blackbox-saliency[bench]'") from err
    ids = check_class_ids(class_ids, images.shape[0], None).to(images.device)
    with frozen(classifier):
        attributions = Saliency(classifier).attribute(images.detach().clone().requires_grad_(True), target=ids)
    return map_to_mask(attributions)


def captum_occlusion(classifier, images: torch.Tensor, class_ids, window: int | None = None) -> torch.Tensor:
    """Captum's ``Occlusion``: the drop of the class logit when a square (1/7 of the image side
    by default, 32 px at 224, without overlap: 49 classifier passes per image) is set to zero,
    made a mask by :func:`map_to_mask` after keeping only drops (negative attributions say the
    patch hurt the class)."""
    try:
        from captum.attr import Occlusion
    except ImportError as err:
        raise ImportError("captum_occlusion needs captum: pip install 'blackbox-saliency[bench]'") from err
    ids = check_class_ids(class_ids, images.shape[0], None).to(images.device)
    side = window or max(2, images.shape[-1] // 7)
    stride = side
    with frozen(classifier), torch.no_grad():
        attributions = Occlusion(classifier).attribute(
            images, target=ids, sliding_window_shapes=(images.shape[1], side, side), strides=(images.shape[1], stride, stride)
        )
    return map_to_mask(attributions.clamp(min=0))


BASELINES: dict[str, Method] = {
    "max box": max_box,
    "centre box": centre_box,
    "gradient": gradient_saliency,
    "Grad-CAM (grad-cam)": grad_cam,
    "Saliency (captum)": captum_saliency,
    "Occlusion (captum)": captum_occlusion,
}
