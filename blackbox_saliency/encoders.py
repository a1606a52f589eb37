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

__all__ = ["SmallEncoder", "build_encoder", "classifier_features", "encoder_pyramid", "DEFAULT_ENCODER"]

#: The one default encoder of ``Explainer``, ``fit_explainer`` and the CLI: it needs no download,
#: so the defaults work offline. Pretrained timm encoders are asked for by name.
DEFAULT_ENCODER = "small"


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


def classifier_features(classifier: nn.Module) -> nn.Module:
    """The feature pyramid of a timm classifier, carrying the classifier's own weights: a
    pretrained encoder that needs no download (hand it to ``fit_explainer(encoder=...)``; it is
    frozen there and saved by its timm name).

    Example:
        >>> import timm
        >>> clf = timm.create_model("resnet18", pretrained=False, num_classes=5)
        >>> [f.shape[1] for f in classifier_features(clf)(torch.zeros(1, 3, 64, 64))]
        [64, 64, 128, 256, 512]
    """
    import timm

    cfg = getattr(classifier, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(classifier, nn.Module) or not name or not timm.is_model(name):
        raise TypeError(
            "classifier: expected a timm model (with pretrained_cfg['architecture']) to take the features of; "
            f"got {type(classifier).__name__}. Build an encoder module yourself, or use a timm encoder name"
        )
    in_chans = next((m.in_channels for m in classifier.modules() if isinstance(m, nn.Conv2d)), 3)
    encoder = build_encoder(name, pretrained=False, in_chans=in_chans)
    missing, _ = encoder.load_state_dict(classifier.state_dict(), strict=False)
    if missing:
        raise ValueError(f"classifier: its weights lack encoder tensors {missing[:5]} (names differ from timm's {name!r})")
    return encoder.to(next(classifier.parameters()).device)


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
    if pretrained:
        _check_weights_reachable(encoder)
    try:
        return timm.create_model(encoder, pretrained=pretrained, features_only=True, in_chans=in_chans, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for models without features_only support
        raise ValueError(f"encoder: timm model {encoder!r} cannot give a feature pyramid ({err})") from err
    except OSError as err:  # weights could not be fetched
        raise RuntimeError(_no_weights_message(encoder, str(err))) from err


def _no_weights_message(encoder: str, why: str) -> str:
    return (
        f"encoder: the pretrained weights of {encoder!r} are not available ({why}). Either download them once "
        f"where there is a network (python -c \"import timm; timm.create_model('{encoder}', pretrained=True)\" "
        "fills the cache used here), or train without them: pretrained_encoder=False (CLI: --no-pretrained-encoder), "
        "encoder='small' (works offline), or an encoder module you have loaded yourself"
    )


def _check_weights_reachable(encoder: str, timeout: float = 3.0) -> None:
    """Fail at once, with the fix, when timm would spend most of a minute retrying a download
    that cannot succeed: the weights are not in the Hugging Face cache and the Hub is offline
    (``HF_HUB_OFFLINE``) or cannot be reached. Weights timm fetches from elsewhere, or a cache
    this cannot see, are left to timm."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(encoder)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return
    names = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names if name):
        return
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(_no_weights_message(encoder, f"not in the cache and HF_HUB_OFFLINE is set; repo {repo}"))
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        raise RuntimeError(_no_weights_message(encoder, f"not in the cache and {host} cannot be reached: {err}")) from err
