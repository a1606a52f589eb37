"""Image encoders for the masking model: the CIFAR variant's small random-init CNN, or any
timm CNN built with ``features_only=True``.

An encoder here is an ``nn.Module`` whose forward returns a list of feature maps, finest first,
with a ``feature_info`` exposing ``channels()`` and ``reduction()`` (timm's convention), so the
decoder can be sized from any backbone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["SmallEncoder", "build_encoder", "encoder_pyramid"]


class _FeatureInfo:
    """The part of timm's ``FeatureInfo`` the masking model uses."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]):
        self._channels = list(channels)
        self._reductions = list(reductions)

    def channels(self) -> list[int]:
        return list(self._channels)

    def reduction(self) -> list[int]:
        return list(self._reductions)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallEncoder(nn.Module):
    """The paper's CIFAR encoder: downsampling blocks of several 3x3 conv layers (3 blocks of 5
    by default), each halving the resolution; random init.

    Example:
        >>> enc = SmallEncoder(widths=(8, 16, 32))
        >>> [f.shape[-1] for f in enc(torch.zeros(1, 3, 32, 32))]
        [16, 8, 4]
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (64, 128, 256), layers_per_block: int = 5):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"widths: need at least 2 blocks, got {list(widths)}")
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block: must be >= 1, got {layers_per_block}")
        blocks, cin = [], in_chans
        for width in widths:
            layers = [_conv_bn_relu(cin, width, stride=2)]
            layers += [_conv_bn_relu(width, width) for _ in range(layers_per_block - 1)]
            blocks.append(nn.Sequential(*layers))
            cin = width
        self.blocks = nn.ModuleList(blocks)
        self.feature_info = _FeatureInfo(widths, [2 ** (i + 1) for i in range(len(widths))])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


def encoder_pyramid(encoder: nn.Module) -> tuple[list[int], list[int]]:
    """``(channels, reductions)`` of an encoder's feature maps, finest first."""
    info = getattr(encoder, "feature_info", None)
    if info is None or not hasattr(info, "channels") or not hasattr(info, "reduction"):
        raise TypeError(
            "encoder: expected a feature-pyramid module with feature_info.channels()/reduction(), "
            "such as timm.create_model(name, features_only=True) or SmallEncoder; got "
            f"{type(encoder).__name__}"
        )
    return list(info.channels()), list(info.reduction())


def build_encoder(
    encoder: str | nn.Module, pretrained: bool = False, in_chans: int = 3, **kwargs: Any
) -> nn.Module:
    """An encoder from a name: ``"small"`` (the CIFAR variant, ``kwargs`` go to
    :class:`SmallEncoder`) or a timm model name (built with ``features_only=True``). A module
    is returned as it is, after checking that it exposes a feature pyramid."""
    if isinstance(encoder, nn.Module):
        encoder_pyramid(encoder)
        return encoder
    if not isinstance(encoder, str):
        raise TypeError(f"encoder: expected 'small', a timm model name or an nn.Module, got {type(encoder).__name__}")
    if encoder == "small":
        return SmallEncoder(in_chans=in_chans, **kwargs)
    import timm

    if not timm.is_model(encoder):
        raise ValueError(f"encoder: {encoder!r} is neither 'small' nor a timm model name")
    try:
        return timm.create_model(encoder, pretrained=pretrained, features_only=True, in_chans=in_chans, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for models without features_only support
        raise ValueError(f"encoder: timm model {encoder!r} cannot give a feature pyramid ({err})") from err
    except OSError as err:  # weights could not be fetched (offline)
        raise RuntimeError(
            f"encoder: could not load pretrained weights for {encoder!r} ({err}); pass "
            "pretrained_encoder=False, or an encoder module you have loaded yourself"
        ) from err
