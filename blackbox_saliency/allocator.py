"""Keep freed memory in the process's heap on Linux, where PyTorch on the CPU otherwise spends
much of its time in the kernel.

glibc's ``malloc`` serves large blocks with a fresh ``mmap`` and hands them back to the kernel as
soon as they are freed (and trims the heap's top above 128 KiB). A network's activations on the
CPU are such blocks, so every forward pass page-faults its memory in again, zeroed by the kernel.
Raising both thresholds keeps that memory in the heap for reuse: measured on this project's 2-core
Xeon (``benchmarks/allocator.py``, docs/speed.md), EfficientNet-Lite0's float32 forward at 224 px
ran 2.8 times as fast, its system CPU time falling from 16 s to 0.9 s, for a sixth more peak
memory. The process's memory then stays near its peak instead of shrinking between passes.

The ``blackbox-saliency`` command calls :func:`keep_freed_memory`, and ``fit_explainer`` (on the
CPU) when its recipe sets ``runtime.keep_freed_memory``; call it yourself before explaining on the CPU. It changes the whole
process, once; setting ``BLACKBOX_SALIENCY_MALLOC=default`` (or glibc's own ``MALLOC_*``
variables) before start keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # bytes: no activation of a model this library trains on a CPU reaches it
OPT_OUT = "BLACKBOX_SALIENCY_MALLOC"
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_applied: bool | None = None  # once per process


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`THRESHOLD` for this process, once.

    Returns whether they are raised: ``False`` off Linux or off glibc, when ``$BLACKBOX_SALIENCY_MALLOC``
    is ``default``, or when the user tuned glibc's allocator through its own variables.

    Example:
        >>> from blackbox_saliency.allocator import keep_freed_memory
        >>> keep_freed_memory() in (True, False)
        True
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if os.environ.get(OPT_OUT, "").lower() == "default" or any(v in os.environ for v in _GLIBC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, THRESHOLD) == 1
    if applied:
        logger.info("glibc keeps freed blocks of up to %d MiB in the heap (faster on the CPU; %s=default to "
                    "keep its behaviour)", THRESHOLD >> 20, OPT_OUT)
    return applied
