"""How a training run uses the machine: device, seeds, precision, memory (passes per batch),
checkpoints, and the running losses it logs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .._distributed import BatchShard
from ..explainer import OLD_CONFIG_DEFAULTS, Explainer, _atomic_write

logger = logging.getLogger("blackbox_saliency.training")

CHECKPOINT_NAME = "last.pt"


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` checked; ``None`` (CUDA when available) is decided with the process group."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: not a device: {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or ``"auto"`` on CUDA or on a CPU with native bf16 (AMX or
    AVX-512 BF16); without it the CPU emulates bf16, slower than float32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private: absent in some builds
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    return False


def check_writable(folder: Path) -> None:
    """Fail before training, not after an hour, if checkpoints cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"checkpoint_dir: {folder} is not writable ({err})") from err


def images_per_pass(batch: int, height: int, width: int, max_pixels: int | None) -> int:
    """How many images of a batch go through the networks at once: all of them, or as many as
    ``max_pixels`` image pixels allow (at least one); the passes' gradients add up to the step's.

    Example:
        >>> images_per_pass(32, 224, 224, 16 * 224 * 224), images_per_pass(32, 112, 112, 16 * 224 * 224)
        (16, 32)
    """
    if max_pixels is None:
        return batch
    return max(1, min(batch, max_pixels // (height * width)))


@contextlib.contextmanager
def placed(classifier: Callable, device: torch.device, channels_last: bool) -> Iterator[None]:
    """The classifier on ``device`` (channels-last if asked) for the run, and back where it was,
    in the default layout, after."""
    if not isinstance(classifier, nn.Module):
        yield
        return
    original = next(iter(classifier.parameters()), torch.empty(0)).device
    classifier.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    try:
        yield
    finally:
        classifier.to(original, memory_format=torch.contiguous_format)


def save_checkpoint(path: Path, explainer: Explainer, optimizer: torch.optim.Optimizer, settings: dict[str, Any],
                    position: tuple[int, int, int], ends: list[int], device: torch.device) -> None:
    """Weights, optimiser, ``position`` ``(epoch, batch, step)``, the stages' ``ends``, random
    generators, the explainer's config and the run's settings, written atomically."""
    state = {
        "model": explainer.state_dict(), "optimizer": optimizer.state_dict(),
        "epoch": position[0], "batch": position[1], "step": position[2], "stage_ends": list(ends),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
        "config": json.dumps(explainer.config.to_dict(), sort_keys=True),
        "settings": json.dumps(settings, sort_keys=True),
    }
    _atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The saved state, or a ``RuntimeError`` naming ``checkpoint_dir`` when it cannot be read."""
    try:
        return torch.load(path, map_location=device, weights_only=True)  # a checkpoint is data, never code
    except Exception as err:  # truncated, corrupted or not ours
        raise RuntimeError(f"checkpoint_dir: {path} is unreadable or corrupted ({err}); delete it or start with "
                           "resume=False") from err


def restore(state: dict[str, Any], path: Path, explainer: Explainer, optimizer: torch.optim.Optimizer,
            settings: dict[str, Any], device: torch.device) -> tuple[int, int, int]:
    """Load ``state`` after checking it comes from a run like this one (its length may grow:
    training extended); returns ``(epoch, batch, step)`` to continue from."""
    strip = lambda c: {k: v for k, v in {**OLD_CONFIG_DEFAULTS, **c}.items() if k != "training"}  # noqa: E731
    if "stage_ends" not in state or json.loads(state["settings"]) != settings:
        raise ValueError(f"resume: {path} was written by a run with another recipe or seed")
    if strip(json.loads(state["config"])) != strip(explainer.config.to_dict()):
        raise ValueError(f"resume: {path} was written by a run with another architecture")
    explainer.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # every process draws the whole batch, so process 0's generators fit them all
    torch.set_rng_state(state["cpu_rng"].cpu())
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    return int(state["epoch"]), int(state["batch"]), int(state["step"])


class Meter:
    """The losses of recent steps, read back from the device only every ``every`` steps (a read
    waits for the device), checked finite and kept as running averages for the log."""

    def __init__(self, shard: BatchShard, every: int = 20):
        self.shard, self.every = shard, every
        self.pending: list[dict[str, torch.Tensor]] = []
        self.running: dict[str, float] = {}
        self.steps_read = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        self.pending.append(terms)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Read the pending losses (summed over processes: every process sees the same values,
        so all stop together on a NaN) into the running averages."""
        if not self.pending:
            return
        names = list(dict.fromkeys(name for terms in self.pending for name in terms))
        nan = torch.tensor(float("nan"), device=self.pending[0]["loss"].device)
        rows = torch.stack([torch.stack([t[n].float() if n in t else nan for n in names]) for t in self.pending])
        rows = (self.shard.sum(rows) / self.shard.world).cpu().tolist()
        for i, row in enumerate(rows):
            values = dict(zip(names, row))
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"fit_explainer: the loss became {values['loss']} at step "
                                         f"{self.steps_read + i + 1}; the last good checkpoint is kept. Try a lower "
                                         "schedule.lr or check the classifier's outputs.")
            for name, value in values.items():
                if math.isfinite(value):
                    old = self.running.get(name)
                    self.running[name] = value if old is None else 0.95 * old + 0.05 * value
        for name in [n for n in self.running if n not in names]:  # a term the current stage no longer has
            del self.running[name]
        self.steps_read += len(self.pending)
        self.pending.clear()

    def summary(self) -> str:
        return ", ".join(f"{name}={value:.4g}" for name, value in self.running.items())
