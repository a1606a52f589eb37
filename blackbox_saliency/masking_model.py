"""The masking model: a U-Net over an encoder's feature pyramid with a class-selecting feature
filter at the coarsest scale (the paper's section 4, figure 4)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import encoder_pyramid

__all__ = ["FeatureFilter", "Upsampler", "MaskingModel", "MaskOutput"]


class MaskOutput(NamedTuple):
    """What the masking model returns for a batch."""

    mask: torch.Tensor
    """``(N, 1, H, W)`` in ``[0, 1]`` at the input resolution."""
    low_res_mask: torch.Tensor
    """``(N, 1, H/r, W/r)``: the mask as produced (``r`` is ``mask_reduction``), before upsampling."""
    selector_logit: torch.Tensor
    """``(N,)``: ``max_ij X_ij^T C_s``, high when class ``s`` is present (the embedding speed-up)."""


class FeatureFilter(nn.Module):
    """``Y_ij = X_ij * sigmoid(X_ij^T C_s)``: attenuates locations unrelated to class ``s``."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, channels)
        nn.init.normal_(self.embedding.weight, std=1.0 / math.sqrt(channels))

    def forward(self, features: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        selector = self.embedding(class_ids)  # (N, C)
        logits = torch.einsum("nchw,nc->nhw", features, selector.to(features.dtype))
        return features * torch.sigmoid(logits).unsqueeze(1), logits.flatten(1).amax(1)


class _Bottleneck(nn.Module):
    """ResNet bottleneck block with identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        mid = max(channels // 4, 4)
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class Upsampler(nn.Module):
    """Upsample by ``factor`` (3x3 conv then pixel shuffle), concatenate the encoder's map at that
    scale, mix with a 1x1 conv, then ``num_bottlenecks`` bottleneck blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, factor: int = 2, num_bottlenecks: int = 1):
        super().__init__()
        self.up = nn.Sequential(
            nn.Conv2d(in_channels, out_channels * factor * factor, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels * factor * factor),
            nn.ReLU(inplace=True),
            nn.PixelShuffle(factor),
        )
        self.mix = nn.Sequential(
            nn.Conv2d(out_channels + skip_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.bottlenecks = nn.Sequential(*[_Bottleneck(out_channels) for _ in range(num_bottlenecks)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.bottlenecks(self.mix(torch.cat([self.up(x), skip], dim=1)))


class MaskingModel(nn.Module):
    """Encoder + feature filter + upsamplers + two-channel head, mask ``|C0| / (|C0| + |C1|)``.

    Decoder widths derive from the encoder: each upsampler has ``width_multiplier`` times the
    channels of the encoder map it joins (0.75 gives the paper's 768/384/192 on ResNet-50).

    Example:
        >>> from blackbox_saliency.encoders import SmallEncoder
        >>> model = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=10)
        >>> out = model(torch.zeros(2, 3, 32, 32), torch.tensor([1, 2]))
        >>> tuple(out.mask.shape), tuple(out.low_res_mask.shape)
        ((2, 1, 32, 32), (2, 1, 8, 8))
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        mask_reduction: int = 4,
        width_multiplier: float = 0.75,
        num_bottlenecks: int = 1,
        freeze_encoder: bool = False,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes: need at least 2 classes, got {num_classes}")
        channels, reductions = encoder_pyramid(encoder)
        if mask_reduction not in reductions:
            raise ValueError(
                f"mask_reduction: the encoder has feature maps at reductions {reductions}, none at {mask_reduction}"
            )
        if reductions[-1] <= mask_reduction:
            raise ValueError(f"encoder: its coarsest map (reduction {reductions[-1]}) must be coarser than the mask's")
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)
        self.num_classes = num_classes
        self.mask_reduction = mask_reduction
        self.stride = reductions[-1]
        self.feature_filter = FeatureFilter(num_classes, channels[-1])
        # Skip connections: every map from just below the coarsest down to the mask's scale.
        self._skip_indices = [i for i in range(len(reductions) - 1) if reductions[i] >= mask_reduction][::-1]
        upsamplers, cin, prev = [], channels[-1], reductions[-1]
        for i in self._skip_indices:
            factor = prev // reductions[i]
            if factor * reductions[i] != prev or factor < 2:
                raise ValueError(f"encoder: reductions {reductions} do not step by whole factors")
            cout = max(8, int(round(width_multiplier * channels[i])))
            upsamplers.append(Upsampler(cin, channels[i], cout, factor, num_bottlenecks))
            cin, prev = cout, reductions[i]
        self.upsamplers = nn.ModuleList(upsamplers)
        self.head = nn.Conv2d(cin, 2, 1)

    def train(self, mode: bool = True) -> "MaskingModel":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics
        return self

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor) -> MaskOutput:
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.stride, (-width) % self.stride
        if pad_h or pad_w:  # any size works: pad to a multiple of the encoder's stride, crop after
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            features = self.encoder(images)
        x, selector_logit = self.feature_filter(features[-1], class_ids)
        for i, upsampler in zip(self._skip_indices, self.upsamplers):
            x = upsampler(x, features[i])
        c0, c1 = self.head(x).float().abs().unbind(1)
        low_res = (c0 / (c0 + c1 + 1e-6)).unsqueeze(1)
        mask = F.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return MaskOutput(mask[..., :height, :width].clamp(0, 1), low_res, selector_logit.float())
