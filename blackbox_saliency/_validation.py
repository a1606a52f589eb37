"""Input checks shared by the public entry points: each error names the argument."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence, Union

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


class OutputError(TypeError):
    """The classifier's output could not be turned into logits. Its message says what to do, so
    :func:`probe_classifier` lets it through instead of reporting a failure of the classifier."""


def _describe(out: object) -> str:
    """A short description of a classifier's output for error messages."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        keys = list(out.keys())
        return f"a {type(out).__name__} with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    if isinstance(out, (tuple, list)):
        parts = [f"tensor {tuple(o.shape)}" if isinstance(o, torch.Tensor) else type(o).__name__ for o in out[:5]]
        return f"a {type(out).__name__} of ({', '.join(parts)}{', ...' if len(out) > 5 else ''})"
    return f"a {type(out).__name__}"


def _example(out: object) -> str:
    """``output=lambda out: ...`` with the most likely expression for this output."""
    if isinstance(out, Mapping):
        key = next((k for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() == 2), None)
        if key is not None:
            return f"output=lambda out: out[{key!r}]"
    if isinstance(out, (tuple, list)):
        i = next((i for i, v in enumerate(out) if isinstance(v, torch.Tensor) and v.dim() == 2), None)
        if i is not None:
            return f"output=lambda out: out[{i}]"
    return "output=lambda out: ..."


def logits_from(out: object, output: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The logits in a classifier's output ``out``: ``output(out)`` when an adapter is given, else
    ``out`` itself when it is a tensor, else, unwrapped, a tensor ``out.logits`` (Hugging Face
    models), ``out["logits"]``, or the first element of a tuple or list. Anything else is an
    :class:`OutputError` that says how to pass ``output=``."""
    if output is not None:
        try:
            logits = output(out)
        except Exception as err:
            raise OutputError(
                f"output: failed on the classifier's output, {_describe(out)} ({type(err).__name__}: {err})"
            ) from err
        if not isinstance(logits, torch.Tensor):
            raise OutputError(f"output: must return a tensor of logits (N, K), returned {_describe(logits)}")
        return logits
    if isinstance(out, torch.Tensor):
        return out
    found, where = None, ""
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        found, where = out.logits, "its .logits"
    elif isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        found, where = out["logits"], 'its "logits" entry'
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        found, where = out[0], "its first element"
    if found is not None and found.dim() == 2:
        return found
    taken = f"; {where} has shape {tuple(found.shape)}, not (N, K)" if found is not None else ""
    raise OutputError(
        f"classifier: returned {_describe(out)}, not a tensor of logits (N, K){taken}; pass explain(..., "
        f"{_example(out)}) to say where the logits are"
    )


class LogitsOf:
    """``classifier`` with its output reduced to the logits tensor by :func:`logits_from`: every
    use of the classifier (probe, top classes, optimisation) goes through this one callable."""

    def __init__(self, classifier: Callable[[torch.Tensor], Any], output: Callable[[Any], torch.Tensor] | None = None):
        if output is not None and not callable(output):
            raise TypeError(
                "output: expected a callable taking the classifier's output and returning logits (N, K), "
                f"got {type(output).__name__}"
            )
        self.classifier = classifier
        self.output = output

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return logits_from(self.classifier(images), self.output)


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
    except OutputError:  # the output, not the classifier, is at fault; the message says what to do
        raise
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
