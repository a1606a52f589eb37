"""``fit_explainer``: train a masking model against a fixed classifier (paper, section 4.1)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ._classifier import device_of, frozen
from ._validation import check_classifier, probe_classifier
from .explainer import Explainer, _atomic_write
from .objective import SaliencyObjective

__all__ = ["fit_explainer", "CHECKPOINT_NAME"]

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "last.pt"
_SYNC_EVERY = 20  # steps between reading losses back from the device


@dataclass
class _Settings:
    """Everything that decides what is trained; a resumed run must match it."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    fake_label_prob: float
    selector: str
    selector_weight: float
    augment: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_dataset(dataset: object) -> tuple[torch.Tensor, int]:
    """A non-empty map-style dataset of ``(image (C,H,W) float tensor, int label)``."""
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"dataset: expected a map-style torch Dataset (with __len__ and __getitem__), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset: is empty")
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"dataset: items must be (image, label) pairs, got {type(item).__name__}")
    image, label = item[0], item[1]
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise TypeError(
            f"dataset: images must be float tensors (C, H, W) as the classifier takes them (add a ToTensor and "
            f"Normalize transform), got {got}"
        )
    if isinstance(label, torch.Tensor):
        if label.numel() != 1 or label.is_floating_point():
            raise TypeError(f"dataset: labels must be integer class ids, got a tensor {label.dtype} {tuple(label.shape)}")
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"dataset: labels must be integer class ids, got {type(label).__name__}")
    return image, int(label)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches: a permutation fixed by ``(seed, epoch)``, so a resumed run sees
    the same batches as an uninterrupted one. The last partial batch is dropped (BatchNorm)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _save_checkpoint(path: Path, explainer: Explainer, optimizer: torch.optim.Optimizer, settings: _Settings,
                     epoch: int, batch: int, step: int, device: torch.device) -> None:
    state = {
        "model": explainer.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
        "config": json.dumps(explainer.config, sort_keys=True),
        "settings": json.dumps(settings.to_dict(), sort_keys=True),
    }
    _atomic_write(path, lambda p: torch.save(state, p))


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint is data, never code
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated, corrupted or not ours
        raise RuntimeError(f"checkpoint_dir: {path} is unreadable or corrupted ({err}); delete it or start with resume=False") from err


def fit_explainer(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    num_classes: int | None = None,
    encoder: str | nn.Module = "resnet50",
    epochs: int = 20,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    *,
    pretrained_encoder: bool = True,
    encoder_kwargs: dict[str, Any] | None = None,
    objective: SaliencyObjective | dict[str, float] | None = None,
    lr: float = 1e-3,
    fake_label_prob: float = 0.3,
    selector: Literal["label", "prediction"] = "label",
    selector_weight: float = 1.0,
    augment: bool = True,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    classifier_info: dict[str, Any] | None = None,
    **explainer_kwargs: Any,
) -> Explainer:
    """Train an :class:`Explainer` for ``classifier`` on ``dataset`` with the paper's objective.

    Args:
        classifier: the black box, mapping ``(N, 3, H, W)`` to logits ``(N, K)``; kept in eval
            mode, its weights never change; moved to ``device`` for training and back after.
        dataset: a map-style dataset of ``(image, label)`` with images as the classifier takes them.
        num_classes: ``K``; default: read from the classifier's output.
        encoder: ``"small"`` (the CIFAR variant: random init, 3 blocks of 5 convs), a timm name,
            or a feature-pyramid module. Pretrained encoders are frozen.
        epochs, batch_size, lr: Adam on the masking model; the last partial batch is dropped.
        device: default CUDA when available (bf16 autocast there), else the CPU.
        checkpoint_dir: where ``last.pt`` is written atomically at every epoch's end and every
            ``checkpoint_every`` steps. ``resume=True`` continues from it.
        seed: makes a run reproducible (on the CPU, bit for bit).
        pretrained_encoder: load timm's weights for a named encoder (needs them in timm's cache).
        objective: a :class:`SaliencyObjective` or a dict of its fields.
        fake_label_prob: share of samples given a wrong class; only the area term applies to
            them, so the model learns an empty mask for a class that is absent.
        selector: the class to explain in training, the dataset's ``"label"`` or the
            classifier's own ``"prediction"``.
        selector_weight: weight of the paper's embedding speed-up, a binary cross-entropy that
            makes ``max_ij sigmoid(X_ij^T C_s)`` high for the real class and low for a fake one.
        augment: random horizontal flips.
        max_steps: stop after this many optimiser steps in all (for quick runs).
        **explainer_kwargs: architecture options of :class:`Explainer` (``mask_reduction``...).

    Returns:
        The trained explainer, in eval mode, on ``device``.

    Example:
        >>> explainer = fit_explainer(classifier, train_set, encoder="small", epochs=20)  # doctest: +SKIP
        >>> masks = explainer(images, class_ids)  # doctest: +SKIP
    """
    classifier = check_classifier(classifier)
    image0, _ = _check_dataset(dataset)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if batch_size > len(dataset):
        raise ValueError(f"batch_size: {batch_size} is larger than the dataset ({len(dataset)} items)")
    if not 0.0 <= fake_label_prob < 1.0:
        raise ValueError(f"fake_label_prob: must be in [0, 1), got {fake_label_prob}")
    if selector not in ("label", "prediction"):
        raise ValueError(f"selector: expected 'label' or 'prediction', got {selector!r}")
    if isinstance(objective, dict):
        objective = SaliencyObjective.from_dict(objective)
    objective = objective or SaliencyObjective()
    if not isinstance(objective, SaliencyObjective):
        raise TypeError(f"objective: expected a SaliencyObjective or a dict, got {type(objective).__name__}")
    device = _resolve_device(device)
    checkpoint_path = None
    if checkpoint_dir is not None:
        checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME
        _check_writable(Path(checkpoint_dir))
    if resume and checkpoint_path is None:
        raise ValueError("resume: needs a checkpoint_dir to resume from")

    settings = _Settings(epochs, batch_size, lr, seed, fake_label_prob, selector, selector_weight, augment)
    original_device = device_of(classifier, device)
    if isinstance(classifier, nn.Module):
        classifier.to(device)
    try:
        with frozen(classifier):
            k = probe_classifier(classifier, image0.unsqueeze(0).to(device), need_gradient=True)
            if num_classes is None:
                num_classes = k
            elif num_classes != k:
                raise ValueError(f"num_classes: given {num_classes} but the classifier returns {k} logits")
            _seed_everything(seed)
            info = dict(classifier_info or {})
            info.setdefault("input_size", list(image0.shape))
            explainer = Explainer(
                num_classes, encoder, pretrained_encoder=pretrained_encoder and isinstance(encoder, str),
                encoder_kwargs=encoder_kwargs, in_chans=image0.shape[0], objective=objective.to_dict(),
                classifier_info=info, **explainer_kwargs,
            ).to(device)
            explainer.config["training"] = settings.to_dict()
            _train(classifier, dataset, explainer, objective, settings, device, checkpoint_path, resume,
                   max_steps, checkpoint_every, num_workers, progress)
    finally:
        if isinstance(classifier, nn.Module):
            classifier.to(original_device)
    return explainer.eval()


def _check_writable(folder: Path) -> None:
    """Fail before training, not after an hour, if checkpoints cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"checkpoint_dir: {folder} is not writable ({err})") from err


def _train(classifier, dataset, explainer: Explainer, objective: SaliencyObjective, settings: _Settings,
           device: torch.device, checkpoint_path: Path | None, resume: bool, max_steps: int | None,
           checkpoint_every: int | None, num_workers: int, progress: bool) -> None:
    params = [p for p in explainer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    start_epoch, start_batch, step = 0, 0, 0
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path, device)
        # epochs may grow (training extended); everything else must match
        saved_settings = {k: v for k, v in json.loads(state["settings"]).items() if k != "epochs"}
        current = {k: v for k, v in settings.to_dict().items() if k != "epochs"}
        strip = lambda c: {k: v for k, v in c.items() if k != "training"}  # noqa: E731
        if saved_settings != current or strip(json.loads(state["config"])) != strip(json.loads(json.dumps(explainer.config))):
            raise ValueError(f"resume: {checkpoint_path} was written by a run with other settings or architecture")
        explainer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch, step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        torch.set_rng_state(state["cpu_rng"].cpu())
        if device.type == "cuda" and state["cuda_rng"].numel():
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        logger.info("resumed from %s at epoch %d, batch %d (step %d)", checkpoint_path, start_epoch, start_batch, step)

    k = explainer.num_classes
    batches_per_epoch = len(_epoch_batches(len(dataset), settings.batch_size, settings.seed, 0))
    total = settings.epochs * batches_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    amp = device.type == "cuda"
    running: dict[str, float] = {}
    bar = tqdm(total=total, initial=min(step, total), disable=not progress, desc="fit_explainer", unit="step")
    position, saved = (start_epoch, start_batch), (start_epoch, start_batch)

    pending: list[dict[str, torch.Tensor]] = []

    def flush() -> None:
        """Sync with the device only here: check the losses since the last flush are finite
        and fold them into the running averages shown by the progress bar."""
        for i, terms in enumerate(pending):
            values = {name: float(value) for name, value in terms.items()}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"fit_explainer: the loss became {values['loss']} at step {step - len(pending) + i + 1}; the last "
                    "good checkpoint is kept. Try a lower lr or check the classifier's outputs."
                )
            for name, value in values.items():
                running[name] = value if name not in running else 0.95 * running[name] + 0.05 * value
        pending.clear()
        bar.set_postfix({n: f"{v:.3g}" for n, v in running.items()}, refresh=False)

    def save() -> None:
        nonlocal saved
        flush()  # never checkpoint weights that a non-finite loss has touched
        if checkpoint_path is not None and saved != position:
            _save_checkpoint(checkpoint_path, explainer, optimizer, settings, *position, step, device)
            saved = position

    explainer.train()
    try:
        for epoch in range(start_epoch, settings.epochs):
            if step >= total:
                break
            batches = _epoch_batches(len(dataset), settings.batch_size, settings.seed, epoch)
            first = start_batch if epoch == start_epoch else 0
            # Its own generator: a loader drawing its worker seed from the global RNG would
            # shift every random draw after a mid-epoch resume.
            loader = DataLoader(dataset, batch_sampler=batches[first:], num_workers=num_workers,
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(settings.seed + epoch))
            for b, (images, labels) in enumerate(loader, start=first):
                images = images.to(device, non_blocking=True).float()
                labels = torch.as_tensor(labels).to(device).long()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss, terms = _batch_loss(classifier, explainer, objective, images, labels, k, settings)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                position = (epoch + 1, 0) if b + 1 == len(batches) else (epoch, b + 1)
                pending.append(terms)
                if len(pending) >= _SYNC_EVERY:
                    flush()
                bar.update(1)
                if checkpoint_every and step % checkpoint_every == 0:
                    save()
                if step >= total:
                    break
            flush()
            logger.info("epoch %d/%d: %s", epoch + 1, settings.epochs,
                        ", ".join(f"{n}={v:.4g}" for n, v in running.items()))
            save()
    finally:
        bar.close()
    area = running.get("area")
    if area is not None and not 0.005 < area < 0.95:
        warnings.warn(
            f"fit_explainer: masks ended {'empty' if area <= 0.005 else 'full'} (mean mask {area:.3f} over the last "
            "steps): the explainer says nothing about where the evidence is. Train longer, or adjust the objective's "
            "area_weight (docs/objective.md describes this case), and check masks on held-out images.",
            stacklevel=3,
        )
    explainer.config["training"]["steps"] = step


def _batch_loss(classifier, explainer: Explainer, objective: SaliencyObjective, images: torch.Tensor,
                labels: torch.Tensor, k: int, settings: _Settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    n = images.shape[0]
    if settings.augment:
        flip = torch.rand(n, 1, 1, 1, device=images.device) < 0.5
        images = torch.where(flip, images.flip(-1), images)
    if settings.selector == "prediction":
        with torch.no_grad():
            labels = classifier(images).argmax(1)
    # A fake class is any other class: (y + U{1..K-1}) mod K.
    fake = torch.rand(n, device=images.device) < settings.fake_label_prob
    shifted = (labels + torch.randint(1, k, (n,), device=images.device)) % k
    class_ids = torch.where(fake, shifted, labels)
    out = explainer.masks_with_details(images, class_ids)
    terms = objective.regulariser_terms(out.low_res_mask)
    real = ~fake
    per_image = objective.area_weight * terms["area"] + objective.tv_weight * terms["tv"] * real
    logged = {"area": out.mask.detach().mean()}
    if real.any():
        clf = objective.classifier_terms(classifier, images[real], out.mask[real], class_ids[real])
        per_image = per_image.index_add(0, real.nonzero().squeeze(1),
                                        objective.preserve_weight * clf["preserve"] + objective.destroy_weight * clf["destroy"])
        logged.update(preserve=clf["preserve"].detach().mean(), destroy=clf["destroy"].detach().mean())
    loss = per_image.mean()
    if settings.selector_weight:
        embed = F.binary_cross_entropy_with_logits(out.selector_logit, real.float())
        loss = loss + settings.selector_weight * embed
        logged["embed"] = embed.detach()
    logged["loss"] = loss.detach()
    return loss, logged
