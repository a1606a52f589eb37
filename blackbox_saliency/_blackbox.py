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
