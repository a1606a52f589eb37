"""Training checkpoints: one ``last.pt`` per run, written atomically, read as data only, and
refused when it was written by a run with other settings or another architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .explainer import OLD_CONFIG_DEFAULTS, Explainer, _atomic_write

CHECKPOINT_NAME = "last.pt"

# Settings renamed since checkpoints were first written: old checkpoints still resume.
_RENAMED_SETTINGS = {"selector": "class_source", "selector_weight": "presence_weight"}
_OLD_SETTINGS_DEFAULTS = {"presence_targets": "class", "removed_peak_weight": 0.0, "removed_peak_cells": 3,
                          "removed_peak_skip_background": None, "decoder_encoder_steps": 0}


def save_checkpoint(path: Path, explainer: Explainer, optimizer: torch.optim.Optimizer, settings: dict[str, Any],
                    epoch: int, batch: int, step: int, device: torch.device, embedding_steps: int) -> None:
    """Weights, optimiser, position ``(epoch, batch, step)``, random generators, the
    explainer's config and the run's settings; ``embedding_steps`` is the stage length used."""
    state = {
        "embedding_steps": embedding_steps,
        "model": explainer.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
        "config": json.dumps(explainer.config.to_dict(), sort_keys=True),
        "settings": json.dumps(settings, sort_keys=True),
    }
    _atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The saved state, or a ``RuntimeError`` naming ``checkpoint_dir`` when it cannot be read."""
    try:
        # weights_only: a checkpoint is data, never code
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated, corrupted or not ours
        raise RuntimeError(f"checkpoint_dir: {path} is unreadable or corrupted ({err}); delete it or start with resume=False") from err


def saved_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The run settings a checkpoint was written with, under today's names."""
    # a checkpoint written before a setting existed means that setting's old default
    return {**_OLD_SETTINGS_DEFAULTS, **{_RENAMED_SETTINGS.get(k, k): v for k, v in json.loads(state["settings"]).items()}}


def restore(state: dict[str, Any], path: Path, explainer: Explainer, optimizer: torch.optim.Optimizer,
            settings: dict[str, Any], device: torch.device) -> tuple[int, int, int]:
    """Load ``state`` into ``explainer``, ``optimizer`` and the random generators after checking
    it comes from a run like this one (``epochs`` may grow: training extended); returns
    ``(epoch, batch, step)`` to continue from."""
    # a checkpoint written before a config field existed means that field's old default
    strip = lambda c: {k: v for k, v in {**OLD_CONFIG_DEFAULTS, **c}.items() if k != "training"}  # noqa: E731
    others = lambda s: {k: v for k, v in s.items() if k != "epochs"}  # noqa: E731
    if (others(saved_settings(state)) != others(settings)
            or strip(json.loads(state["config"])) != strip(explainer.config.to_dict())):
        raise ValueError(f"resume: {path} was written by a run with other settings or architecture")
    explainer.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # Every process's generators are in the same state (they draw the whole batch), so
    # process 0's saved state fits them all, with any number of processes.
    torch.set_rng_state(state["cpu_rng"].cpu())
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    return int(state["epoch"]), int(state["batch"]), int(state["step"])
