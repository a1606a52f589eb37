"""Using a black-box classifier without changing it: eval mode and no parameter gradients
for the duration, everything restored afterwards."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def device_of(module: object, default: torch.device | str = "cpu") -> torch.device:
    """The device of a module's first parameter or buffer, else ``default``."""
    if isinstance(module, nn.Module):
        for tensor in list(module.parameters()) + list(module.buffers()):
            return tensor.device
    return torch.device(default)


@contextlib.contextmanager
def frozen(classifier: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Eval mode and ``requires_grad=False`` on its parameters inside, restored on exit."""
    if not isinstance(classifier, nn.Module):
        yield classifier
        return
    was_training = classifier.training
    grads = [(p, p.requires_grad) for p in classifier.parameters()]
    classifier.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield classifier
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        classifier.train(was_training)


def head_weight(classifier: object, num_classes: int) -> torch.Tensor:
    """The weight ``(K, D)`` of a classifier's final linear layer (timm's ``get_classifier()``,
    else the last ``nn.Linear`` or 1x1 ``nn.Conv2d`` with ``K`` outputs), for explainers whose
    class embeddings derive from it."""
    layers: list[nn.Module] = []
    if isinstance(classifier, nn.Module):
        get = getattr(classifier, "get_classifier", None)
        if callable(get) and isinstance(get(), nn.Module):
            layers.append(get())
        layers += list(classifier.modules())[::-1]
    for layer in layers:
        if isinstance(layer, nn.Linear) and layer.out_features == num_classes:
            return layer.weight.detach()
        if isinstance(layer, nn.Conv2d) and layer.out_channels == num_classes and layer.kernel_size == (1, 1):
            return layer.weight.detach().flatten(1)
    raise ValueError(
        f"class_embedding: 'classifier_head' needs the classifier's final layer, an nn.Linear (or 1x1 conv) with "
        f"{num_classes} outputs, and {type(classifier).__name__} has none; use class_embedding='learned'"
    )
