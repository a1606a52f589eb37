"""``fit_explainer``: resolve a recipe, build the explainer, run its stages (paper, section 4.1)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .._blackbox import frozen, head_weight
from .._distributed import ProcessGroup, join_process_group, sync_batchnorm, unsync_batchnorm
from .._precision import PartPrecision, measure_parts, with_precision
from .._validation import check_classifier, probe_classifier
from ..allocator import keep_freed_memory
from ..encoders import classifier_features
from ..explainer import Explainer
from ..recipes import EmbeddingStage, Recipe, resolve_recipe
from .data import BatchSource, check_dataset, dataset_labels, epoch_batches, sample
from .runtime import (CHECKPOINT_NAME, Meter, check_writable, images_per_pass, load_checkpoint, placed, resolve_device,
                      restore, save_checkpoint, seed_everything, use_bf16)
from .stages import Freezer, StageContext, TrainingForward, build_stages, stage_ends

__all__ = ["fit_explainer", "CHECKPOINT_NAME"]

logger = logging.getLogger("blackbox_saliency.training")

# fit_explainer's keywords before recipes -> where each setting lives now
_MOVED = {
    **{name: f"model.{name}" for name in ("encoder", "pretrained_encoder", "encoder_kwargs", "mask_reduction",
                                          "width_multiplier", "num_bottlenecks", "class_filter", "class_embedding",
                                          "presence_std_threshold", "gate_encoder")},
    **{name: f"runtime.{name}" for name in ("precision", "channels_last", "num_workers", "preload",
                                            "checkpoint_every", "log_every")},
    "objective": "the objective group (recipe.replace(objective={...}))",
    "batch_size": "schedule.batch_size", "lr": "schedule.lr", "fake_label_prob": "sampling.fake_label_prob",
    "class_source": "sampling.class_source", "selector": "sampling.class_source", "augment": "sampling.flip",
    "embedding_steps": "an EmbeddingStage's share in schedule.stages",
    "freeze_embedding": "a MaskStage's filter ('learns', 'presence_only' or 'fixed') in schedule.stages",
    "presence_weight": "a MaskStage's presence_weight in schedule.stages",
    "selector_weight": "a MaskStage's presence_weight in schedule.stages",
    "removed_peak_weight": "an EmbeddingStage's removed_peak_weight in schedule.stages",
    "max_steps": "the steps= argument", "num_classes": "nothing: it is read from the classifier's output",
    "classifier_info": "explainer.config.classifier, set after training",
}
_GONE = ("embedding_loss", "presence_targets", "removed_peak_cells", "removed_peak_skip_background",
         "decoder_encoder_steps")


def fit_explainer(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    recipe: str | Recipe = "auto",
    *,
    steps: int | None = None,
    epochs: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    init_from: Explainer | str | os.PathLike | None = None,
    progress: bool = True,
    **removed: Any,
) -> Explainer:
    """Train an :class:`Explainer` for ``classifier`` on ``dataset`` with the paper's objective.

    Args:
        classifier: the black box, mapping ``(N, C, H, W)`` to logits ``(N, K)``; kept in eval
            mode, its weights never change; on ``device`` for training and back after.
        dataset: a map-style dataset of ``(image (C, H, W) float tensor, int label)``, images as
            the classifier takes them (normalised, at its input size). One with a
            ``batch(indices)`` method (:class:`~blackbox_saliency.datasets.DecodedImages`) is read
            a whole batch at a time.
        recipe: a name from :func:`~blackbox_saliency.recipes.list_recipes`, ``"auto"`` (default:
            ``"timm"`` for a timm classifier with a linear head, else ``"small"``) or a
            :class:`~blackbox_saliency.recipes.Recipe` (``get_recipe("timm").replace(...)``).
        steps, epochs: the run's length, in optimiser steps or passes over the data (one of
            them); default: the recipe's.
        device: default CUDA when available, else the CPU. Under ``torchrun`` each process takes
            ``cuda:LOCAL_RANK`` and a share of every batch (docs/distributed.md).
        seed: makes a run reproducible (on the CPU, bit for bit).
        checkpoint_dir: where ``last.pt`` is written atomically (every
            ``recipe.runtime.checkpoint_every`` steps and every epoch's end); ``resume=True``
            continues from it, and refuses a checkpoint of another recipe or seed.
        init_from: start from this explainer's weights (an :class:`Explainer`, a folder or a Hub
            repo id), e.g. one trained for a related classifier; the recipe must build the same
            architecture. Its class embeddings are kept only when the class count is the same.
        progress: a tqdm progress bar; the losses and images/s are also logged at INFO.

    Returns:
        The trained explainer, in eval mode, on ``device``; its ``config.training`` holds the
        recipe's name, its settings and any overrides.

    Example:
        >>> explainer = fit_explainer(classifier, train_set)  # doctest: +SKIP
        >>> explainer = fit_explainer(classifier, train_set, "cifar", epochs=4)  # doctest: +SKIP
        >>> masks = explainer(images, class_ids)  # doctest: +SKIP
    """
    if removed:
        raise TypeError(_removed_message(sorted(removed)))
    classifier = check_classifier(classifier)
    image0, _ = check_dataset(dataset)
    recipe = _with_length(resolve_recipe(recipe, classifier), steps, epochs)
    _check_run(seed, resume, checkpoint_dir, progress, init_from)
    init = Explainer.from_pretrained(init_from) if isinstance(init_from, (str, os.PathLike)) else init_from
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    if checkpoint is not None:
        check_writable(checkpoint.parent)
    group = join_process_group(resolve_device(device))
    try:
        if recipe.schedule.batch_size % group.shard.world or recipe.schedule.batch_size > len(dataset):
            raise ValueError(f"schedule.batch_size: {recipe.schedule.batch_size} must divide among "
                             f"{group.shard.world} process(es) and be at most the dataset's {len(dataset)} items")
        if recipe.runtime.keep_freed_memory and group.device.type == "cpu":
            keep_freed_memory()
        layout = group.device.type == "cpu" if recipe.runtime.channels_last is None else recipe.runtime.channels_last
        with frozen(classifier), placed(classifier, group.device, layout):
            num_classes = probe_classifier(classifier, image0.unsqueeze(0).to(group.device), need_gradient=True)
            seed_everything(seed)
            explainer = build_explainer(classifier, recipe, image0, num_classes, group.device, init)
            _record(explainer, recipe, seed, dataset, init_from)
            explainer.to(group.device, memory_format=torch.channels_last if layout else torch.contiguous_format)
            try:
                _Run(classifier, dataset, explainer, recipe, group, seed, layout).run(checkpoint, resume, progress)
            finally:
                explainer.to(memory_format=torch.contiguous_format)  # inference and saving expect it
        return explainer.eval()
    finally:
        group.close()


def _removed_message(names: list[str]) -> str:
    lines = []
    for name in names:
        if name in _MOVED:
            lines.append(f"{name}= is now {_MOVED[name]}")
        elif name in _GONE:
            lines.append(f"{name}= was a research setting and is gone (research/README.md)")
        else:
            lines.append(f"{name}= is not an argument")
    return ("fit_explainer: " + "; ".join(lines) + ". Settings live in recipes: fit_explainer(classifier, dataset, "
            "get_recipe('timm').replace(**{'schedule.batch_size': 16})), or on the command line --set key=value")


def _with_length(recipe: Recipe, steps: int | None, epochs: int | None) -> Recipe:
    if steps is not None and epochs is not None:
        raise ValueError(f"steps, epochs: give one of the two, got steps={steps!r} and epochs={epochs!r}")
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if steps is None and epochs is None:
        return recipe
    # a run-level length, not an override of the recipe
    return dataclasses.replace(recipe, schedule=dataclasses.replace(recipe.schedule, steps=steps, epochs=epochs))


def _check_run(seed: object, resume: object, checkpoint_dir: object, progress: object, init_from: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    for name, value in (("resume", resume), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume: needs a checkpoint_dir to resume from")
    if init_from is not None and not isinstance(init_from, (Explainer, str, os.PathLike)):
        raise TypeError(f"init_from: expected an Explainer, a folder or a Hub repo id, got {type(init_from).__name__}")


def _encoder(classifier: object, name: str) -> str | nn.Module:
    if name != "classifier":
        return name
    try:
        return classifier_features(classifier)
    except TypeError as err:
        raise ValueError(f"model.encoder: 'classifier' needs a timm classifier, got {type(classifier).__name__}; use "
                         "recipe='small' or a timm encoder name") from err


def classifier_info(classifier: object, image0: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """What the classifier's timm config says of it (name, normalisation, class names) and
    the input size training saw."""
    cfg = getattr(classifier, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    info: dict[str, Any] = {"input_size": list(image0.shape)}
    if cfg.get("architecture"):
        info["name"] = f"{cfg['architecture']} (timm)"
    for key in ("mean", "std"):
        if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == image0.shape[0]:
            info[key] = [float(v) for v in cfg[key]]
    names = cfg.get("class_names")
    if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        info["class_names"] = list(names)
    return info


def build_explainer(classifier: Callable, recipe: Recipe, image0: torch.Tensor, num_classes: int,
                    device: torch.device, init: Explainer | None = None) -> Explainer:
    """The untrained explainer ``recipe.model`` describes (its class filter filled from the
    classifier's head when the recipe says so), started from ``init``'s weights if given."""
    m = recipe.model
    if m.encoder == "classifier" and not m.pretrained_encoder:  # random weights would be another encoder
        raise ValueError("model.pretrained_encoder: False does not apply to model.encoder 'classifier', the "
                         "classifier's own trained features; for random weights name a timm encoder")
    encoder = _encoder(classifier, m.encoder)
    head = head_weight(classifier, num_classes, image0.unsqueeze(0).to(device)) if m.class_embedding == "classifier_head" else None
    explainer = Explainer(
        num_classes, encoder, pretrained_encoder=m.pretrained_encoder and isinstance(encoder, str),
        encoder_kwargs=dict(m.encoder_kwargs), in_chans=image0.shape[0], mask_reduction=m.mask_reduction,
        width_multiplier=m.width_multiplier, num_bottlenecks=m.num_bottlenecks, objective=recipe.objective.to_dict(),
        classifier_info=classifier_info(classifier, image0, num_classes), class_filter=m.class_filter,
        class_embedding=m.class_embedding, class_embedding_features=None if head is None else head.shape[1],
        presence_std_threshold=m.presence_std_threshold, gate_encoder=m.gate_encoder)
    if head is not None:  # a classifier's own features start the map from its head's input path
        explainer.masking_model.feature_filter.set_head(head, getattr(encoder, "head_input_map", None))
    if init is not None:
        _start_from(explainer, init, head)
    return explainer


def _start_from(explainer: Explainer, init: Explainer, head: torch.Tensor | None) -> None:
    """``init``'s weights, but for the class-specific ones when the class counts differ."""
    state = init.state_dict()
    per_class = {"masking_model.feature_filter.head_weight", "masking_model.feature_filter.embedding.weight"}
    same = init.num_classes == explainer.num_classes
    if not same:
        state = {k: v for k, v in state.items() if k not in per_class}
        logger.info("init_from: %d classes, not %d: its class embeddings are left out", init.num_classes,
                    explainer.num_classes)
    try:
        missing, unexpected = explainer.load_state_dict(state, strict=same)
    except RuntimeError as err:
        raise ValueError(f"init_from: its weights do not fit the explainer this recipe builds: {err}") from err
    if set(missing) - per_class or unexpected:
        raise ValueError(f"init_from: its weights do not fit the explainer this recipe builds (missing {missing}, "
                         f"unexpected {unexpected})")
    if head is not None:  # the rows of the classifier trained against, not of init_from's
        explainer.masking_model.feature_filter.set_head(head)


def _record(explainer: Explainer, recipe: Recipe, seed: int, dataset: Dataset, init_from: object) -> None:
    """The recipe, its overrides and the run's seed in ``config.training``; the classes the
    masks learn, when they are known beforehand and not all of them (``explain`` warns for others)."""
    training: dict[str, Any] = {"recipe": recipe.name, "overrides": dict(recipe.overrides), "seed": seed,
                                "settings": {k: v for k, v in recipe.to_dict().items()
                                             if k not in ("name", "description", "overrides")}}
    labels = dataset_labels(dataset) if recipe.sampling.class_source == "label" else None
    if labels is not None:
        present = torch.unique(labels[(labels >= 0) & (labels < explainer.num_classes)]).tolist()
        if len(present) < explainer.num_classes:
            training["classes_explained"] = present
    if init_from is not None:
        training["init_from"] = "an Explainer object" if isinstance(init_from, Explainer) else os.fspath(init_from)
    explainer.config.training = training


class _Run:
    """One training run: the optimiser, the stages in turn, checkpoints, the log."""

    def __init__(self, classifier: Callable, dataset: Dataset, explainer: Explainer, recipe: Recipe,
                 group: ProcessGroup, seed: int, channels_last: bool):
        self.classifier, self.dataset, self.explainer, self.recipe = classifier, dataset, explainer, recipe
        self.group, self.shard, self.device, self.seed = group, group.shard, group.device, seed
        self.channels_last = channels_last
        self.params = [p for p in explainer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=recipe.schedule.lr)
        self.per_process = recipe.schedule.batch_size // self.shard.world
        self.batches_per_epoch = len(dataset) // recipe.schedule.batch_size
        s = recipe.schedule
        self.total = s.steps if s.steps is not None else s.epochs * self.batches_per_epoch
        self.ends = stage_ends(s.stages, self.total)
        self.position, self.step = (0, 0), 0
        self.freezer, self.meter = Freezer(), Meter(self.shard)
        self.stage_index: int | None = None
        self.resumed_precision: dict[str, str] | None = None
        self.settings = _settings(recipe, seed)

    def run(self, checkpoint: Path | None, resume: bool, progress: bool) -> None:
        self.checkpoint = checkpoint
        if resume and checkpoint is not None and checkpoint.exists():
            self._resume(checkpoint)
        self.saved = self.position
        self.meter.steps_read = self.step
        source = BatchSource(self.dataset, self.device, self.explainer.num_classes, self.recipe.runtime.num_workers,
                             self.recipe.runtime.preload)
        context = StageContext(self.classifier, self.recipe.objective, self.explainer.num_classes, self.recipe.sampling,
                               self.shard)
        self.stages = build_stages(self.recipe.schedule.stages, context)
        self.shape = source.shape
        self._set_precision(source.shape)
        self.forward = self._forward()
        self.bar = tqdm(total=self.total, initial=min(self.step, self.total), disable=not (progress and self.group.is_main),
                        desc="fit_explainer", unit="step")
        self.explainer.train()
        self._logged = (self.step, time.perf_counter())  # the first logged rate counts from here
        try:
            self._loop(source)
        finally:
            self.bar.close()
            self.freezer.release()
            if self.shard.distributed:
                unsync_batchnorm(self.explainer)
        self._finish()

    def _resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, self.device)
        epoch, batch, self.step = restore(state, checkpoint, self.explainer, self.optimizer, self.settings, self.device)
        self.position = (epoch, batch)
        # the stages keep the lengths they started with; only the last one follows a longer run
        self.ends = [min(int(e), self.total) for e in state["stage_ends"][:-1]] + [self.total]
        self.resumed_precision = json.loads(state["config"]).get("training", {}).get("precision_parts")
        if self.group.is_main:
            logger.info("resumed from %s at epoch %d, batch %d (step %d)", checkpoint, epoch, batch, self.step)

    def _set_precision(self, shape: torch.Size) -> None:
        """bf16 autocast per part: as the run it resumes chose, or timed here (``"auto"`` on a CPU
        with native bf16), or as the recipe says."""
        runtime, device = self.recipe.runtime, self.device
        bf16 = use_bf16(runtime.precision, device)
        parts = PartPrecision(bf16, bf16, bf16)
        if self.resumed_precision:  # a resumed run keeps the precision it started with
            parts = PartPrecision.from_dict(self.resumed_precision)
        elif runtime.precision == "auto" and bf16 and device.type == "cpu" and not self.shard.distributed:
            res = self.recipe.schedule.stages[-1].resolution
            size = torch.Size([shape[0], round(shape[1] * res), round(shape[2] * res)])
            parts = measure_parts(self.classifier, self.explainer.masking_model, size,
                                  images_per_pass(self.per_process, size[1], size[2], runtime.max_pixels_per_pass),
                                  self.explainer.num_classes, device, self.channels_last,
                                  embedding_stage=any(isinstance(s, EmbeddingStage) for s in self.recipe.schedule.stages))
        self.parts = parts
        if parts.label == "mixed":  # the classifier's own precision, whatever the stage's autocast
            for stage in self.stages:
                stage.context.classifier = with_precision(self.classifier, parts.classifier, device.type)
        self.explainer.config.training.update(precision=parts.label, precision_parts=parts.to_dict(),
                                              channels_last=self.channels_last)

    def _forward(self) -> nn.Module:
        forward: nn.Module = TrainingForward(self.explainer)
        if self.shard.distributed:
            sync_batchnorm(self.explainer, self.device)
            # stages leave parts without gradients (the decoder in the embedding stage, a fixed filter)
            forward = nn.parallel.DistributedDataParallel(
                forward, device_ids=[self.device] if self.device.type == "cuda" else None, find_unused_parameters=True)
        return forward

    def _loop(self, source: BatchSource) -> None:
        epoch, first = self.position
        while self.step < self.total:
            rows = [batch[self.shard.rank * self.per_process : (self.shard.rank + 1) * self.per_process]
                    for batch in epoch_batches(len(self.dataset), self.recipe.schedule.batch_size, self.seed, epoch)]
            for b, (images, labels) in enumerate(source.batches(rows[first:], self.seed + epoch), start=first):
                self._enter_stage()
                self._step(images, labels)
                self.position = (epoch + 1, 0) if b + 1 == len(rows) else (epoch, b + 1)
                self._after_step()
                if self.step >= self.total:
                    break
            self.meter.flush()
            if self.group.is_main:
                logger.info("epoch %d: %s", epoch + 1, self.meter.summary())
            self._save()
            epoch, first = epoch + 1, 0

    def _enter_stage(self) -> None:
        index = next(i for i, end in enumerate(self.ends) if self.step < end)
        if index == self.stage_index:
            return
        self.freezer.release()
        begin = self.ends[index - 1] if index else 0
        stage = self.stages[index]
        stage.start(self.explainer, self.freezer, at_beginning=self.step == begin)
        self.stage_index = index
        h, w = (round(s * stage.spec.resolution) for s in self.shape[1:])
        self.per_pass = images_per_pass(self.per_process, h, w, self.recipe.runtime.max_pixels_per_pass)
        if self.group.is_main:
            passes = -(-self.per_process // self.per_pass)
            logger.info("stage %d/%d (%s, steps %d-%d): %d x %d px, batches of %d%s", index + 1, len(self.stages),
                        stage.name, begin + 1, self.ends[index], h, w, self.per_process,
                        f" in {passes} passes of up to {self.per_pass} (runtime.max_pixels_per_pass)" if passes > 1 else "")

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        stage, n = self.stages[self.stage_index], images.shape[0]
        bf16 = self.parts.embedding_stage if stage.name == "embedding" else self.parts.masking_model
        self.optimizer.zero_grad(set_to_none=True)
        starts = list(range(0, n, self.per_pass))
        logged: list[tuple[dict[str, torch.Tensor], float]] = []
        for i, start in enumerate(starts):
            x, y = images[start : start + self.per_pass], labels[start : start + self.per_pass]
            x = sample(x.to(self.params[0].dtype if self.params else torch.float32), self.recipe.sampling,
                       stage.spec.resolution, self.shard)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            quiet = self.forward.no_sync() if self.shard.distributed and i + 1 < len(starts) else contextlib.nullcontext()
            with quiet, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, terms = stage.loss(self.forward, x, y)
            share = x.shape[0] / n
            (loss * share).backward()
            logged.append((terms, share))
        self.optimizer.step()
        self.step += 1
        self.meter.add(_weighted(logged))
        self.bar.update(1)

    def _after_step(self) -> None:
        every, runtime = self.recipe.runtime.log_every, self.recipe.runtime
        if every and self.step % every == 0:
            self.meter.flush()  # on every process: it sums the losses across them
            now = time.perf_counter()
            last = getattr(self, "_logged", (self.step - every, now))
            if self.group.is_main:
                rate = (self.step - last[0]) * self.recipe.schedule.batch_size / max(now - last[1], 1e-9)
                logger.info("step %d/%d: %s; %.1f images/s", self.step, self.total, self.meter.summary(), rate)
            self._logged = (self.step, now)
        if runtime.checkpoint_every and self.step % runtime.checkpoint_every == 0:
            self._save()

    def _save(self) -> None:
        self.meter.flush()  # never checkpoint weights that a non-finite loss has touched
        if self.checkpoint is None or self.saved == self.position:
            return
        if self.group.is_main:
            save_checkpoint(self.checkpoint, self.explainer, self.optimizer, self.settings,
                            (*self.position, self.step), self.ends, self.device)
        self.saved = self.position

    def _finish(self) -> None:
        area = self.meter.running.get("area")
        if self.group.is_main and area is not None and not 0.01 < area < 0.95:
            warnings.warn(
                f"fit_explainer: masks ended {'empty' if area <= 0.01 else 'full'} (mean mask {area:.3f} over the last "
                "steps): the explainer says nothing about where the evidence is. Train longer, or adjust the objective's "
                "area_weight (docs/objective.md), and check masks on held-out images.", stacklevel=4)
        self.explainer.config.training.update(steps=self.step, stage_ends=list(self.ends))


def _settings(recipe: Recipe, seed: int) -> dict[str, Any]:
    """What decides what a run learns, which a resumed run must match: the recipe but for its
    runtime and length, and the seed."""
    values = {k: v for k, v in recipe.to_dict().items() if k not in ("runtime", "description", "overrides", "name")}
    values["schedule"] = {k: v for k, v in values["schedule"].items() if k not in ("steps", "epochs")}
    return {"recipe": values, "seed": seed}


def _weighted(logged: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """The passes' terms as the batch's: each weighted by its share of the images that have it."""
    names = list(dict.fromkeys(name for terms, _ in logged for name in terms))
    out = {}
    for name in names:
        pairs = [(terms[name], share) for terms, share in logged if name in terms]
        out[name] = sum(value.float() * share for value, share in pairs) / sum(share for _, share in pairs)
    return out
