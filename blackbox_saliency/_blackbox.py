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


def head_weight(classifier: object, num_classes: int, probe: torch.Tensor | None = None) -> torch.Tensor:
    """The weight ``(K, D)`` of a classifier's final linear layer, for explainers whose class
    embeddings derive from it: timm's ``get_classifier()`` when the model has one, else the last
    ``nn.Linear`` (or plain 1x1 ``nn.Conv2d``) with ``K`` outputs. With ``probe`` (an input
    batch), the layer's output must be the classifier's logits (pooled, for a conv), so a layer
    that is not the last word (a distillation head, a second head averaged in) is refused."""

    def fits(layer: object) -> bool:
        if isinstance(layer, nn.Linear):
            return layer.out_features == num_classes
        return (isinstance(layer, nn.Conv2d) and layer.out_channels == num_classes and layer.kernel_size == (1, 1)
                and layer.groups == 1 and layer.stride == (1, 1) and layer.dilation == (1, 1))

    problem = None
    layer: nn.Module | None = None
    get = getattr(classifier, "get_classifier", None) if isinstance(classifier, nn.Module) else None
    if callable(get):  # the model says which layer is its head: that one or none
        candidate = get()
        layer = candidate if fits(candidate) else None
        if layer is None:
            problem = f"its get_classifier() is {type(candidate).__name__}, not an nn.Linear with {num_classes} outputs"
    elif isinstance(classifier, nn.Module):
        layer = next((m for m in reversed(list(classifier.modules())) if fits(m)), None)
        if layer is None:
            problem = f"it has no nn.Linear (or 1x1 conv) with {num_classes} outputs"
    else:
        problem = "it is not an nn.Module"
    if layer is not None and probe is not None:
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(output))
        try:
            with torch.no_grad():
                logits = classifier(probe)
        finally:
            handle.remove()
        out = seen[-1] if seen else None
        if out is not None and out.dim() == 4:
            out = out.flatten(2).mean(2)
        if out is None or not isinstance(logits, torch.Tensor) or out.shape != logits.shape or not torch.allclose(
                out.float(), logits.float(), rtol=1e-3, atol=1e-3):
            layer, problem = None, f"the output of its {type(layer).__name__} with {num_classes} outputs is not its logits"
    if layer is None:
        raise ValueError(f"class_embedding: 'classifier_head' needs the classifier's final linear layer, and for "
                         f"{type(classifier).__name__} {problem}; use class_embedding='learned'")
    return layer.weight.detach().flatten(1)
