"""Which parts of a training step run under bf16 autocast, measured on the CPU it trains on.

On a CPU with native bf16 (AMX) whether autocast pays differs by part, network and size:
measured on this project's 2-core Xeon (``benchmarks/precision_parts.py``, docs/fit.md), the
EfficientNet-Lite0 black box's forward and backward ran at half the float32 rate under bf16 at
128 px, its explainer about level at 128 px and 1.3 times as fast at 224 px, and the CIFAR-10
ResNet-9 twice as fast. So ``precision="auto"`` times each part on one batch and runs each in
whichever precision is faster.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger("blackbox_saliency.training")


def describe_cpu() -> str:
    """The CPU's model and what decides bf16 autocast's speed on it, for benchmark headers: e.g.
    ``"Intel(R) Xeon(R) ... (AVX512, AMX-BF16)"`` or ``"AMD EPYC (AVX2)"``. The same command
    measures differently on the two (no AMX: bf16 is emulated), so a figure names which ran it.

    Example:
        >>> describe_cpu().endswith(")")
        True
    """
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the platform's own name, without the flags
        pass
    features = [torch.backends.cpu.get_cpu_capability()]
    features += [label for flag, label in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    return f"{name or platform.processor() or platform.machine()} ({', '.join(features)})"


# bf16 must beat float32 by this much to be chosen: a near tie keeps float32, so that the choice
# does not flip with the machine's load between two runs of the same command.
BF16_MARGIN = 1.15
# A part whose pass takes less than this in both precisions is too quick to time reliably (and
# to matter): it keeps the caller's default.
MIN_SECONDS = 0.05


@dataclass(frozen=True)
class PartPrecision:
    """bf16 autocast (True) or float32 for the masking model, for the classifier, and for the
    embedding stage (the encoder and class filter alone: another pass, which may differ)."""

    masking_model: bool
    classifier: bool
    embedding_stage: bool

    @property
    def label(self) -> str:
        if self.masking_model == self.classifier == self.embedding_stage:
            return "bf16" if self.masking_model else "fp32"
        return "mixed"

    def to_dict(self) -> dict[str, str]:
        return {part: "bf16" if getattr(self, part) else "fp32"
                for part in ("masking_model", "classifier", "embedding_stage")}

    @classmethod
    def from_dict(cls, parts: dict[str, str]) -> PartPrecision:
        masking_model = parts["masking_model"] == "bf16"
        return cls(masking_model, parts["classifier"] == "bf16",
                   parts.get("embedding_stage", parts["masking_model"]) == "bf16")


def with_precision(classifier: Callable[[torch.Tensor], torch.Tensor], bf16: bool,
                   device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The classifier under its own precision, whatever autocast the caller runs in."""

    def run(images: torch.Tensor) -> torch.Tensor:
        if not bf16 and images.dtype in (torch.bfloat16, torch.float16):  # never down: float64 stays float64
            images = images.float()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            return classifier(images)

    return run


def _seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # the first call picks oneDNN's kernels and allocates; a run pays that once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def masking_pass(masking_model: nn.Module, images: torch.Tensor, class_ids: torch.Tensor,
                 bf16: bool) -> Callable[[], None]:
    """The masking model's forward and backward into its trainable weights, as one step."""
    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = masking_model(images, class_ids)
        if out.mask.requires_grad:
            out.mask.float().mean().backward()
    return step


def embedding_pass(masking_model: nn.Module, images: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """The embedding stage's pass: the encoder and class filter scoring every class, and back."""
    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = masking_model.presence(images)
        if scores.requires_grad:
            scores.float().mean().backward()
    return step


def classifier_pass(classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    bf16: bool) -> Callable[[], None]:
    """The classifier's forward and backward to its input, as the preserve and destroy terms need."""
    def step() -> None:
        x = images.detach().requires_grad_(True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = classifier(x)
        logits.float().logsumexp(1).sum().backward()
    return step


def measure_parts(classifier: Callable[[torch.Tensor], torch.Tensor], masking_model: nn.Module,
                  image_shape: torch.Size, batch: int, num_classes: int, device: torch.device,
                  channels_last: bool, default: bool = True, embedding_stage: bool = True,
                  repeats: int = 2) -> PartPrecision:
    """Time each part's forward and backward on one batch of random images in float32 and in
    bf16 autocast (the embedding stage's pass only if ``embedding_stage``, else it follows the
    masking model); bf16 where it is at least ``BF16_MARGIN`` times as fast, ``default`` where
    both passes take under ``MIN_SECONDS``. Leaves no trace: no global random draw, no
    gradient, the masking model's buffers (BatchNorm) as they were."""
    g = torch.Generator().manual_seed(0)
    dtype = next(masking_model.parameters()).dtype
    images = torch.randn(batch, *image_shape, generator=g).to(device, dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    class_ids = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    buffers = {name: b.clone() for name, b in masking_model.named_buffers()}

    try:
        chosen, rates = {}, {}
        passes = {"masking model": lambda bf16: masking_pass(masking_model, images, class_ids, bf16),
                  "classifier": lambda bf16: classifier_pass(classifier, images, bf16)}
        if embedding_stage:
            passes["embedding stage"] = lambda bf16: embedding_pass(masking_model, images, bf16)
        for part, make in passes.items():
            fp32, bf16 = _seconds(make(False), repeats), _seconds(make(True), repeats)
            chosen[part] = default if max(fp32, bf16) < MIN_SECONDS else fp32 / bf16 >= BF16_MARGIN
            rates[part] = (batch / fp32, batch / bf16)
    finally:
        for p in masking_model.parameters():
            p.grad = None
        with torch.no_grad():
            for name, b in masking_model.named_buffers():
                b.copy_(buffers[name])
    parts = PartPrecision(chosen["masking model"], chosen["classifier"],
                          chosen.get("embedding stage", chosen["masking model"]))
    logger.info("precision auto, timed on one batch of %d (float32 / bf16 images/s): %s", batch, "; ".join(
        f"{part} {'bf16' if chosen[part] else 'fp32'} ({rates[part][0]:.1f} / {rates[part][1]:.1f})" for part in rates))
    return parts
