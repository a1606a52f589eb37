"""Machinery for training on several processes (``torchrun``): the process group, this
process's share of each global batch, random draws that do not depend on how a batch is
split, and batch norm whose statistics span every process.

The design goal is that ``fit_explainer`` under ``torchrun --nproc_per_node=N`` computes what
one process computes with the same ``batch_size``, up to float noise: every process draws the
random numbers of the *whole* batch from identically seeded generators and keeps its own rows,
statistics are reduced over all processes, and DistributedDataParallel averages gradients of
per-process means of equal-sized shares.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchShard:
    """This process's share of a global batch: rows ``[rank * n, (rank + 1) * n)`` of
    ``world * n``. The default (one process) draws exactly what plain ``torch.rand`` would."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        n = full.shape[0] // self.world
        return full[self.rank * n : (self.rank + 1) * n]

    def rand(self, n: int, *shape: int, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """``torch.rand(n, *shape)`` as this process's rows of the global batch's draw."""
        return self._rows(torch.rand(n * self.world, *shape, device=device, dtype=dtype))

    def randn(self, n: int, *shape: int, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._rows(torch.randn(n * self.world, *shape, device=device, dtype=dtype))

    def randint(self, low: int, high: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        return self._rows(torch.randint(low, high, (n * self.world,), device=device))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over every process (not differentiable; a copy)."""
        tensor = tensor.clone()
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def channel_stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) std of each channel over the global batch, shaped ``(1, C, 1, 1)``."""
        c = images.shape[1]
        flat = images.detach().transpose(0, 1).reshape(c, -1)
        if not self.distributed:
            mean = flat.mean(dim=1)
            std = flat.std(dim=1) if flat.shape[1] > 1 else torch.ones_like(mean)
        else:
            count = flat.shape[1] * self.world
            mean = self.sum(flat.sum(dim=1)) / count
            # two passes, as torch.std does: no cancellation on large-mean channels
            deviation = self.sum((flat - mean[:, None]).pow(2).sum(dim=1))
            std = (deviation / max(count - 1, 1)).sqrt()
        return mean.view(1, c, 1, 1), std.clamp_min(1e-3).view(1, c, 1, 1)


LOCAL = BatchShard()


@dataclass
class ProcessGroup:
    """Where this process stands: its shard and device, and whether we opened the group."""

    shard: BatchShard
    device: torch.device
    opened_here: bool

    @property
    def is_main(self) -> bool:
        return self.shard.rank == 0

    def close(self) -> None:
        if self.opened_here and dist.is_initialized():
            dist.destroy_process_group()


def join_process_group(device: torch.device | None) -> ProcessGroup:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...), or one the caller already opened; one
    process otherwise. NCCL for CUDA devices, gloo for the CPU. An unindexed CUDA device
    becomes ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not (dist.is_available() and (dist.is_initialized() or world > 1)):
        return ProcessGroup(LOCAL, device or _default_device(), False)
    if device is None:
        device = _default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    opened = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        opened = True
    shard = BatchShard(dist.get_rank(), dist.get_world_size())
    if shard.rank == 0:
        logger.info("training on %d processes (%s backend)", shard.world, dist.get_backend())
    return ProcessGroup(shard, device, opened)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _SumOverProcesses(torch.autograd.Function):
    """``all_reduce(SUM)`` with its gradient: every process's output depends on every input,
    so each input's gradient is the sum of the gradients of all the outputs."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _AllReduceBatchNorm2d(nn.BatchNorm2d):
    """Batch norm with batch statistics over every process, for the CPU (torch's
    ``SyncBatchNorm`` runs on GPUs only). Gradients flow through the all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        all_reduce = _SumOverProcesses.apply
        c = x.shape[1]
        count = x.numel() // c * dist.get_world_size()
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * count / max(count - 1, 1)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased, momentum)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def _is_trainable_bn(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None
            and module.weight.requires_grad)


def _swap_batchnorm(module: nn.Module, should_swap: Callable[[nn.Module], bool], cls: type) -> nn.Module:
    """Replace, in place, every batch norm below ``module`` that ``should_swap`` picks with a
    ``cls`` sharing its parameters and buffers (so state dicts keep their keys)."""
    for name, child in module.named_children():
        if should_swap(child):
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            _swap_batchnorm(child, should_swap, cls)
    return module


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Trainable batch norms take their statistics over every process: torch's
    ``SyncBatchNorm`` on GPUs, :class:`_AllReduceBatchNorm2d` on the CPU. Frozen ones (a
    pretrained encoder's, in eval mode) are left alone."""
    cls = nn.SyncBatchNorm if device.type == "cuda" else _AllReduceBatchNorm2d
    return _swap_batchnorm(module, _is_trainable_bn, cls)


def unsync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`sync_batchnorm`: plain ``BatchNorm2d`` again, same parameters."""
    return _swap_batchnorm(module, lambda m: isinstance(m, (nn.SyncBatchNorm, _AllReduceBatchNorm2d)), nn.BatchNorm2d)
