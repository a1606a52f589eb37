"""Input checks shared by the public entry points: each error names the argument."""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

ClassIds = Union[int, Sequence[int], torch.Tensor]


def check_images(images: object, name: str = "images", channels: int | None = None, min_size: int = 1,
                 finite: bool = True) -> torch.Tensor:
    """A float ``(N, C, H, W)`` tensor with finite values (``finite=False``: values already
    checked), or a clear error."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(f"{name}: expected shape (N, C, H, W), got {tuple(images.shape)}{hint}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (normalised as the classifier takes it), got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if min(images.shape[-2:]) < min_size:
        raise ValueError(f"{name}: images must be at least {min_size}x{min_size} pixels, got {tuple(images.shape[-2:])}")
    if finite and not _all_finite(images):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return images


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every element is finite, without a batch-sized temporary: a sum is finite
    exactly when no element is NaN or inf, unless it overflows; only then look chunk by chunk."""
    if torch.isfinite(tensor.sum()):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_class_ids(class_ids: ClassIds, batch_size: int, num_classes: int | None, name: str = "class_ids") -> torch.Tensor:
    """An int64 ``(N,)`` tensor from an int, a sequence or a tensor, every id in range."""
    if isinstance(class_ids, bool):
        raise TypeError(f"{name}: expected an int, a list of ints or a tensor, got bool")
    if isinstance(class_ids, int):
        ids = torch.full((batch_size,), class_ids, dtype=torch.long)
    elif isinstance(class_ids, torch.Tensor):
        if class_ids.is_floating_point() or class_ids.is_complex() or class_ids.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got {class_ids.dtype}")
        ids = class_ids.detach().reshape(-1).long().cpu() if class_ids.dim() <= 1 else None
        if ids is None:
            raise ValueError(f"{name}: expected shape (N,), got {tuple(class_ids.shape)}")
        if class_ids.dim() == 0:
            ids = ids.expand(batch_size).clone()
    elif isinstance(class_ids, (list, tuple)):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in class_ids):
            raise TypeError(f"{name}: expected a list of ints, got {class_ids!r}")
        ids = torch.tensor(list(class_ids), dtype=torch.long)
    else:
        raise TypeError(f"{name}: expected an int, a list of ints or a tensor, got {type(class_ids).__name__}")
    if ids.numel() != batch_size:
        raise ValueError(f"{name}: got {ids.numel()} class ids for {batch_size} images")
    if num_classes is not None and ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
        bad = ids[(ids < 0) | (ids >= num_classes)][0].item()
        raise ValueError(f"{name}: class id {bad} is out of range for {num_classes} classes")
    return ids


def check_logits(logits: object, batch_size: int, name: str = "classifier") -> torch.Tensor:
    """The classifier's output must be a float ``(N, K)`` tensor."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: must return a tensor of logits (N, K), returned {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != batch_size:
        raise ValueError(f"{name}: must return logits of shape (N, K) = ({batch_size}, K), returned {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"{name}: must return at least 2 class logits, returned {tuple(logits.shape)}")
    return logits


def check_classifier(classifier: object) -> Callable[[torch.Tensor], torch.Tensor]:
    if not callable(classifier):
        raise TypeError(f"classifier: expected an nn.Module or a callable, got {type(classifier).__name__}")
    return classifier  # type: ignore[return-value]


def probe_classifier(classifier: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                     need_gradient: bool = False) -> int:
    """Run the classifier once on ``image`` (``(1, C, H, W)``) and return its class count ``K``.

    Errors from inside the classifier (a dtype, device or size it cannot take) are re-raised
    naming the argument; with ``need_gradient`` the logits must depend differentiably on the
    input, since both training and the iterative method follow that gradient.
    """
    x = image.detach().clone().requires_grad_(need_gradient)
    try:
        with torch.set_grad_enabled(need_gradient):
            logits = classifier(x)
    except Exception as err:  # anything the model raises: say which input it was
        raise ValueError(
            f"classifier: failed on an input of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device} "
            f"({type(err).__name__}: {err})"
        ) from err
    logits = check_logits(logits, 1)
    if need_gradient and not logits.requires_grad:
        raise TypeError(
            "classifier: its logits do not depend differentiably on the input (no gradient); the method needs a "
            "differentiable classifier (no torch.no_grad, argmax or numpy inside its forward)"
        )
    return logits.shape[1]
