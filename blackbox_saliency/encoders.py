"""Image encoders for the masking model: the CIFAR variant's small random-init CNN, any timm
CNN built with ``features_only=True``, or a timm vision transformer turned into a pyramid by
:class:`SimpleFeaturePyramid`.

An encoder here is an ``nn.Module`` whose forward returns a list of feature maps, finest first,
with a ``feature_info`` exposing ``channels()`` and ``reduction()`` (timm's convention), so the
decoder can be sized from any backbone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallEncoder", "SimpleFeaturePyramid", "build_encoder", "classifier_features", "encoder_pyramid",
           "frozen_part", "DEFAULT_ENCODER"]

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


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` map (ViTDet's normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _pyramid_level(dim: int, out: int, ups: int, pool: bool) -> nn.Sequential:
    """One level of the simple feature pyramid: ``ups`` stride-2 deconvolutions (halving the
    channels each time, LayerNorm and GELU between them) or a 2x2 max pool, then a 1x1
    projection to ``out`` channels and a 3x3 conv, each followed by LayerNorm."""
    layers: list[nn.Module] = []
    for i in range(ups):
        if i:
            layers += [_LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, max(dim // 2, 1), 2, stride=2))
        dim = max(dim // 2, 1)
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Conv2d(dim, out, 1, bias=False), _LayerNorm2d(out),
               nn.Conv2d(out, out, 3, padding=1, bias=False), _LayerNorm2d(out)]
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """A feature pyramid from a single-scale transformer: ViTDet's simple feature pyramid (Li et
    al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection").

    The trunk (a timm ``features_only`` ViT: every map at the patch size ``P``) gives the last
    block's patch tokens as one ``(N, D, H/P, W/P)`` map. From it come maps at every power-of-two
    reduction from ``finest`` (default 4, the masking model's mask resolution) to ``2P``: finer
    ones by stride-2 transposed convolutions (two for 1/4 when ``P`` is 16), ``P`` itself as it
    is, ``2P`` by a 2x2 max pool; each is then projected to ``channels`` channels (1x1 conv,
    LayerNorm, 3x3 conv, LayerNorm). For ``P = 16``: reductions 4, 8, 16, 32, as a ResNet's.

    The pyramid's layers are new (random init) whatever the trunk's weights: ``freeze_encoder``
    freezes only the trunk (:func:`frozen_part`).

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=1, dynamic_img_size=True)
        >>> enc = SimpleFeaturePyramid(vit, channels=32)
        >>> enc.feature_info.reduction(), [f.shape[-1] for f in enc(torch.zeros(1, 3, 64, 64))]
        ([4, 8, 16, 32], [16, 8, 4, 2])
    """

    def __init__(self, trunk: nn.Module, channels: int | Sequence[int] = 256, finest: int = 4):
        super().__init__()
        dims, reductions = encoder_pyramid(trunk)
        patch = reductions[-1]
        if len(set(reductions)) != 1:
            raise ValueError(f"trunk: expected a single-scale transformer (all reductions equal), got {reductions}")
        if finest < 1 or finest & (finest - 1):
            raise ValueError(f"finest: expected a power of two, got {finest}")
        if patch < 1 or patch & (patch - 1):
            raise ValueError(
                f"encoder: the transformer's patch size {patch} is not a power of two, so no maps at 1/{finest}, "
                f"1/{2 * finest}... can be made from it by stride-2 steps; build the ViT with a power-of-two patch "
                "size (timm resamples pretrained patch embeddings: encoder_kwargs={'patch_size': 16})"
            )
        ups = []  # deconvolutions per level, finest first; -1 is the max-pooled level
        r = min(finest, patch)
        while r < patch:
            ups.append((patch // r).bit_length() - 1)
            r *= 2
        ups += [0, -1]
        widths = [channels] * len(ups) if isinstance(channels, int) else list(channels)
        if len(widths) != len(ups) or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths):
            raise ValueError(f"channels: expected a positive int or {len(ups)} of them (one per level), got {channels!r}")
        self.trunk = trunk
        self.levels = nn.ModuleList(_pyramid_level(dims[-1], c, max(u, 0), u < 0) for c, u in zip(widths, ups))
        self.feature_info = _FeatureInfo(widths, [patch >> u if u >= 0 else 2 * patch for u in ups])

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The trunk's timm configuration: its architecture names this encoder in a config."""
        return getattr(self.trunk, "pretrained_cfg", None) or {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.trunk(x)[-1]
        return [level(tokens) for level in self.levels]


def frozen_part(encoder: nn.Module) -> nn.Module:
    """What ``freeze_encoder`` keeps fixed: the whole encoder, except for a
    :class:`SimpleFeaturePyramid`, whose new pyramid layers are always trained: only its trunk."""
    return encoder.trunk if isinstance(encoder, SimpleFeaturePyramid) else encoder


def classifier_features(classifier: nn.Module) -> nn.Module:
    """The feature pyramid of a timm classifier, carrying the classifier's own weights: a
    pretrained encoder that needs no download (hand it to ``fit_explainer(encoder=...)``; it is
    frozen there and saved by its timm name). For a vision transformer it is a
    :class:`SimpleFeaturePyramid` on the classifier's blocks (only the trunk is frozen); the
    transformer's shape (input and patch size, depth, width, heads) goes into the explainer's
    ``encoder_kwargs`` so that it loads again.

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
    timm_kwargs = _vit_shape(classifier)
    encoder = build_encoder(name, pretrained=False, in_chans=in_chans, **timm_kwargs)
    target = encoder
    if isinstance(encoder, SimpleFeaturePyramid):  # a transformer: its weights go to the trunk's model
        target = getattr(encoder.trunk, "model", encoder.trunk)
    missing, _ = target.load_state_dict(classifier.state_dict(), strict=False)
    if missing:
        raise ValueError(f"classifier: its weights lack encoder tensors {missing[:5]} (names differ from timm's {name!r})")
    encoder.timm_kwargs = timm_kwargs  # how to build it again (Explainer records them in its config)
    if not isinstance(encoder, SimpleFeaturePyramid):  # a ViT pyramid's maps are new layers, not the head's input
        encoder.head_input_map = _head_input_map(classifier, encoder_pyramid(encoder)[0][-1])
    return encoder.to(next(classifier.parameters()).device)


def _head_input_map(classifier: nn.Module, channels: int) -> torch.Tensor | None:
    """``M`` ``(D, C)``: the linear part of how the last feature map reaches the classifier's
    head: identity when the head reads that map directly (ResNets), else a timm ``conv_head``
    1x1 conv with its BatchNorm scale folded in (EfficientNets, MobileNets); None otherwise.
    ``h_k^T M x`` is then the class activation map of class ``k`` without its nonlinearity: the
    starting point of a ``class_embedding="classifier_head"`` explainer's class embedding."""
    get = getattr(classifier, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return None
    conv, norm = getattr(classifier, "conv_head", None), getattr(classifier, "bn2", None)
    if conv is None:  # nothing between the last map and the head but pooling (a ResNet's fc)
        return torch.eye(channels) if head.in_features == channels else None
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1
            and conv.in_channels == channels and conv.out_channels == head.in_features):
        return None
    weight = conv.weight.detach().flatten(1).float().cpu()
    if isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None:
        scale = norm.running_var.detach().float().cpu().add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.detach().float().cpu()
        weight = scale[:, None] * weight
    return weight


def _vit_shape(classifier: nn.Module) -> dict[str, Any]:
    """The timm arguments that shape a vision transformer classifier when they may differ from
    its name's defaults (input and patch size, depth, width, heads); ``{}`` for other models."""
    patch_embed, blocks = getattr(classifier, "patch_embed", None), getattr(classifier, "blocks", None)
    if patch_embed is None or blocks is None or not hasattr(classifier, "embed_dim"):
        return {}
    shape: dict[str, Any] = {"depth": len(blocks), "embed_dim": int(classifier.embed_dim)}
    for key in ("img_size", "patch_size"):
        value = getattr(patch_embed, key, None)
        if value is not None:
            shape[key] = [int(v) for v in value] if isinstance(value, (tuple, list)) else int(value)
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None)
    if heads is not None:
        shape["num_heads"] = int(heads)
    return shape


def build_encoder(
    encoder: str | nn.Module, pretrained: bool = False, in_chans: int = 3, **kwargs: Any
) -> nn.Module:
    """An encoder from a name: ``"small"`` (the CIFAR variant, ``kwargs`` go to
    :class:`SmallEncoder`) or a timm model name (built with ``features_only=True``). A module
    is returned as it is, after checking that it exposes a feature pyramid.

    A timm model whose maps are all at one scale (a vision transformer: ViT, DeiT, EVA...) is
    wrapped in a :class:`SimpleFeaturePyramid` on its last block; ``pyramid_channels`` (default
    256) sets the pyramid's channels, other ``kwargs`` go to timm (``img_size``, ``patch_size``,
    ``depth``...), and the ViT takes any input size (``dynamic_img_size=True``, where the model has
    that option, unless given)."""
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
    pyramid_channels = kwargs.pop("pyramid_channels", None)
    single_scale = _is_single_scale(encoder, in_chans, kwargs)
    if single_scale is None and "out_indices" not in kwargs:  # timm's default, the last 3 blocks, fails under depth 3
        single_scale = _is_single_scale(encoder, in_chans, {**kwargs, "out_indices": 1}) or None
    if pyramid_channels is not None and single_scale is False:
        raise ValueError(f"encoder_kwargs: pyramid_channels is for single-scale transformers; {encoder!r} has a pyramid")
    if single_scale:
        kwargs.setdefault("out_indices", 1)  # the last block's tokens only
        if "dynamic_img_size" not in kwargs and _is_single_scale(encoder, in_chans, {**kwargs, "dynamic_img_size": True}):
            kwargs["dynamic_img_size"] = True
    if pretrained:
        _check_weights_reachable(encoder)
    try:
        model = timm.create_model(encoder, pretrained=pretrained, features_only=True, in_chans=in_chans, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for models without features_only support
        raise ValueError(f"encoder: timm model {encoder!r} cannot give a feature pyramid ({err})") from err
    except OSError as err:  # weights could not be fetched
        raise RuntimeError(_no_weights_message(encoder, str(err))) from err
    if single_scale is None:
        single_scale = len(set(encoder_pyramid(model)[1])) == 1
    if not single_scale:
        if pyramid_channels is not None:
            raise ValueError(f"encoder_kwargs: pyramid_channels is for single-scale transformers; {encoder!r} has a pyramid")
        return model
    return SimpleFeaturePyramid(model, 256 if pyramid_channels is None else pyramid_channels)


def _is_single_scale(encoder: str, in_chans: int, kwargs: dict[str, Any]) -> bool | None:
    """Whether timm's ``features_only`` model of that name has all its maps at one reduction (a
    vision transformer), found on the meta device (no memory, no weights); ``None`` when it cannot
    be built there (the real build then decides, and reports any error)."""
    import timm

    try:
        with torch.device("meta"):
            options = {k: v for k, v in kwargs.items() if k != "checkpoint_path"}  # read once, by the real build
            probe = timm.create_model(encoder, pretrained=False, features_only=True, in_chans=in_chans, **options)
        return len(set(encoder_pyramid(probe)[1])) == 1
    except Exception:  # noqa: BLE001 - any failure here is reported by the real build
        return None


def _no_weights_message(encoder: str, why: str) -> str:
    return (
        f"encoder: the pretrained weights of {encoder!r} are not available ({why}). Either download them once "
        f"where there is a network (python -c \"import timm; timm.create_model('{encoder}', pretrained=True)\" "
        "fills the cache used here), or train without them: pretrained_encoder=False, "
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
