"""Recipes: named, frozen training settings for :func:`~blackbox_saliency.fit_explainer`.

A recipe is five small groups: ``model`` (the masking model's architecture), ``objective``
(:class:`~blackbox_saliency.SaliencyObjective`), ``schedule`` (stages, length, batch, learning
rate), ``sampling`` (which class each image is explained for, fake classes, augmentation) and
``runtime`` (precision, memory, logging). Recipes are registered by name, as timm registers its
models, and changed with :meth:`Recipe.replace`; every change is kept in ``overrides``, which
goes with the recipe's name into the trained explainer's config and model card.

Named recipes:

- ``"timm"``: for a timm classifier with a linear head. The encoder is the classifier's own
  frozen features and the class filter is made from its head (its class activation maps,
  standardised per image), so nothing but the decoder trains and classes the data lacks are
  covered too; masks train at half the classifier's resolution, then at its own.
- ``"cifar"``: the small random-init encoder (the paper's CIFAR variant), with a long class
  embedding stage that is then kept fixed; the shipped CIFAR-10 explainer's recipe.
- ``"small"``: the small encoder for CIFAR-sized classifiers that are not timm models; the class
  filter reads its own copy of the encoder, trained on class presence throughout.
- ``"paper"``: the paper's settings as written (ResNet-50 encoder with its pretrained weights,
  the paper's objective weights, one stage where everything learns).
- ``"auto"``: ``"timm"`` for a timm classifier with a linear head, else ``"small"``.

Example:
    >>> recipe = get_recipe("cifar").replace(objective={"area_weight": 6.0}, **{"schedule.epochs": 4})
    >>> recipe.objective.area_weight, recipe.schedule.epochs, recipe.overrides
    (6.0, 4, {'objective.area_weight': 6.0, 'schedule.epochs': 4})
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Mapping, Union

from torch import nn

from .objective import SaliencyObjective

__all__ = ["Recipe", "ModelSettings", "Schedule", "EmbeddingStage", "MaskStage", "Sampling", "Runtime",
           "get_recipe", "list_recipes", "register_recipe", "resolve_recipe"]

logger = logging.getLogger(__name__)

FILTER_MODES = ("learns", "presence_only", "fixed")


def _fail(name: str, expected: str, value: object) -> None:
    raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _check_int(name: str, value: object, low: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, f"an int >= {low}" + (" or None" if optional else ""), value)


def _check_number(name: str, value: object, low: float = 0.0, high: float = math.inf, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        _fail(name, f"a number in [{low}, {high}]" + (" or None" if optional else ""), value)


def _check_choice(name: str, value: object, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        _fail(name, f"one of {choices}", value)


@dataclass(frozen=True)
class ModelSettings:
    """The masking model (see :class:`~blackbox_saliency.Explainer` for each field).

    ``encoder``: ``"small"`` (random init, the CIFAR variant), ``"classifier"`` (the timm
    classifier's own features, frozen) or a timm model name (``pretrained_encoder``: its weights).
    """

    encoder: str = "small"
    pretrained_encoder: bool = True
    encoder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mask_reduction: int = 4
    width_multiplier: float = 0.75
    num_bottlenecks: int | None = None
    class_filter: Literal["all", "bottleneck"] = "all"
    class_embedding: Literal["learned", "classifier_head"] = "learned"
    presence_std_threshold: float | None = None
    gate_encoder: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            _fail("model.encoder", "'small', 'classifier' or a timm model name", self.encoder)
        _check_int("model.mask_reduction", self.mask_reduction)
        _check_number("model.width_multiplier", self.width_multiplier, 1e-3)
        _check_int("model.num_bottlenecks", self.num_bottlenecks, 0, optional=True)
        _check_choice("model.class_filter", self.class_filter, ("all", "bottleneck"))
        _check_choice("model.class_embedding", self.class_embedding, ("learned", "classifier_head"))
        _check_number("model.presence_std_threshold", self.presence_std_threshold, -100, 100, optional=True)
        for name in ("pretrained_encoder", "gate_encoder"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"model.{name}", "True or False", getattr(self, name))
        if not isinstance(self.encoder_kwargs, Mapping):
            _fail("model.encoder_kwargs", "a dict", self.encoder_kwargs)


@dataclass(frozen=True)
class EmbeddingStage:
    """Train only the class filter (and a trainable encoder) to tell which classes an image
    holds, before any mask: the authors' separate first stage.

    ``share``: of the run's steps. ``removed_peak_weight``: also train on each image with the
    filter's peak for its class removed, against the classifier's probability there, which ties
    the filter to what the classifier uses. ``resolution``: images at this fraction of their size.
    """

    share: float
    removed_peak_weight: float = 0.0
    resolution: float = 1.0

    def __post_init__(self) -> None:
        _check_number("stage share", self.share, 0.0, 1.0)
        _check_number("stage removed_peak_weight", self.removed_peak_weight)
        _check_number("stage resolution", self.resolution, 0.05, 1.0)


@dataclass(frozen=True)
class MaskStage:
    """Train the masks with the objective.

    ``filter``: what becomes of the class filter here: ``"learns"`` (from every loss, the
    paper's), ``"presence_only"`` (the filter and its encoder learn from the presence loss alone,
    and the encoder the decoder reads stays as it is) or ``"fixed"``. ``presence_weight``: the
    presence loss's weight while the filter learns. ``resolution``: of the images' size.
    ``area_weight``: the objective's area weight in this stage (None: the objective's own); a
    first stage with a lighter one lets the masks learn to keep the class before they shrink.
    """

    share: float
    filter: Literal["learns", "presence_only", "fixed"] = "learns"
    presence_weight: float = 1.0
    resolution: float = 1.0
    area_weight: float | None = None

    def __post_init__(self) -> None:
        _check_number("stage share", self.share, 0.0, 1.0)
        _check_choice("stage filter", self.filter, FILTER_MODES)
        _check_number("stage presence_weight", self.presence_weight)
        _check_number("stage resolution", self.resolution, 0.05, 1.0)
        _check_number("stage area_weight", self.area_weight, optional=True)


Stage = Union[EmbeddingStage, MaskStage]
_STAGE_KINDS: dict[str, type] = {"embedding": EmbeddingStage, "masks": MaskStage}


def _refuse_unknown(where: str, values: Mapping[str, Any], cls: type, extra: tuple[str, ...] = ()) -> None:
    known = [f.name for f in fields(cls)] + list(extra)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {known}")


def _stage_from(value: Any) -> Stage:
    if isinstance(value, (EmbeddingStage, MaskStage)):
        return value
    if not isinstance(value, Mapping) or value.get("kind") not in _STAGE_KINDS:
        _fail("schedule.stages", "stages with kind 'embedding' or 'masks'", value)
    cls = _STAGE_KINDS[value["kind"]]
    _refuse_unknown(f"stage {value['kind']}", value, cls, extra=("kind",))
    return cls(**{k: v for k, v in value.items() if k != "kind"})


@dataclass(frozen=True)
class Schedule:
    """How long and in what order: ``stages`` share the run, whose length is ``steps``
    (optimiser steps) or ``epochs`` (passes over the data), one of the two."""

    stages: tuple[Stage, ...] = (MaskStage(1.0),)
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3

    def __post_init__(self) -> None:
        stages = tuple(_stage_from(s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages or not any(isinstance(s, MaskStage) for s in stages):
            _fail("schedule.stages", "at least one mask stage", self.stages)
        if abs(sum(s.share for s in stages) - 1.0) > 1e-6:
            _fail("schedule.stages", "shares that add up to 1", [s.share for s in stages])
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"schedule: give steps or epochs, one of the two (got steps={self.steps!r}, "
                             f"epochs={self.epochs!r})")
        _check_int("schedule.steps", self.steps, optional=True)
        _check_int("schedule.epochs", self.epochs, optional=True)
        _check_int("schedule.batch_size", self.batch_size)
        _check_number("schedule.lr", self.lr, 1e-12, 10.0)


@dataclass(frozen=True)
class Sampling:
    """Which class each training image is explained for, and how images vary.

    ``class_source``: the dataset's ``"label"`` or the classifier's own ``"prediction"`` (for
    data labelled in other classes than the classifier's, or not at all). ``fake_label_prob``:
    share of images given another class, whose mask must then be empty. ``flip``: random
    horizontal flips. ``crop_scale``: each image is a random square crop covering this share of
    it, resized back.
    """

    class_source: Literal["label", "prediction"] = "label"
    fake_label_prob: float = 0.3
    flip: bool = True
    crop_scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        _check_choice("sampling.class_source", self.class_source, ("label", "prediction"))
        _check_number("sampling.fake_label_prob", self.fake_label_prob, 0.0, 0.99)
        if not isinstance(self.flip, bool):
            _fail("sampling.flip", "True or False", self.flip)
        scale = tuple(self.crop_scale) if isinstance(self.crop_scale, (list, tuple)) else None
        if scale is None or len(scale) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in scale) or not 0 < scale[0] <= scale[1] <= 1:
            _fail("sampling.crop_scale", "(low, high) with 0 < low <= high <= 1", self.crop_scale)
        object.__setattr__(self, "crop_scale", (float(scale[0]), float(scale[1])))


@dataclass(frozen=True)
class Runtime:
    """How a run uses the machine; nothing here changes what is learnt, up to float rounding.

    ``precision``: ``"auto"`` (bf16 autocast on CUDA; on a CPU with native bf16 each part is
    timed and runs in the faster precision), ``"bf16"`` or ``"fp32"``. ``max_pixels_per_pass``:
    a batch larger than this many image pixels is split into passes whose gradients add up
    (the same step, less memory); ``None``: never split. ``keep_freed_memory``: let the
    process keep freed memory in its heap (faster on a CPU; changes the whole process, so off
    unless asked; the CLI turns it on). ``checkpoint_every`` and ``log_every``: in steps.
    """

    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool | None = None
    num_workers: int = 0
    preload: bool = False
    max_pixels_per_pass: int | None = 16 * 224 * 224
    keep_freed_memory: bool = False
    checkpoint_every: int | None = 250
    log_every: int | None = 100

    def __post_init__(self) -> None:
        _check_choice("runtime.precision", self.precision, ("auto", "bf16", "fp32"))
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            _fail("runtime.channels_last", "True, False or None", self.channels_last)
        _check_int("runtime.num_workers", self.num_workers, 0)
        _check_int("runtime.max_pixels_per_pass", self.max_pixels_per_pass, optional=True)
        _check_int("runtime.checkpoint_every", self.checkpoint_every, optional=True)
        _check_int("runtime.log_every", self.log_every, optional=True)
        for name in ("preload", "keep_freed_memory"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"runtime.{name}", "True or False", getattr(self, name))


_GROUPS: dict[str, type] = {"model": ModelSettings, "objective": SaliencyObjective, "schedule": Schedule,
                            "sampling": Sampling, "runtime": Runtime}


@dataclass(frozen=True)
class Recipe:
    """Everything :func:`~blackbox_saliency.fit_explainer` trains with, in five groups.

    Example:
        >>> recipe = get_recipe("small")
        >>> Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
        True
    """

    name: str
    model: ModelSettings = ModelSettings()
    objective: SaliencyObjective = SaliencyObjective()
    schedule: Schedule = Schedule(epochs=20)
    sampling: Sampling = Sampling()
    runtime: Runtime = Runtime()
    description: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with ``changes``: a group name with a dict of its fields (``objective={"area_weight":
        12}``) or a dotted path (``**{"schedule.stages.1.resolution": 1.0}``; a stage by its
        index). Each change is recorded in :attr:`overrides`."""
        recipe, overrides = self, dict(self.overrides)
        for key, value in changes.items():
            if key in _GROUPS and isinstance(value, Mapping):
                pairs = [(f"{key}.{name}", item) for name, item in value.items()]
            else:
                pairs = [(key, value)]
            for path, item in pairs:
                before = recipe
                recipe = _set_path(recipe, path.split("."), item)
                if recipe != before:  # a setting given its own value is no change
                    overrides[path] = _plain(item)
        return dataclasses.replace(recipe, overrides=overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: every group's fields, each stage with its ``kind``."""
        return json.loads(json.dumps(_plain(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Recipe":
        """The recipe :meth:`to_dict` wrote; unknown keys are refused, naming them."""
        if not isinstance(values, Mapping):
            _fail("recipe", "a dict", values)
        _refuse_unknown("recipe", values, cls)
        groups = {name: _group_from(name, values[name]) for name in _GROUPS if name in values}
        return cls(name=values.get("name", "custom"), description=values.get("description", ""),
                   overrides=dict(values.get("overrides", {})), **groups)


def _plain(value: Any) -> Any:
    """A recipe, group or stage as plain JSON-able values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        kind = next((k for k, cls in _STAGE_KINDS.items() if isinstance(value, cls)), None)
        return {"kind": kind, **out} if kind else out
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _group_from(name: str, values: Any) -> Any:
    cls = _GROUPS[name]
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        _fail(name, "a dict", values)
    if cls is SaliencyObjective:
        return SaliencyObjective.from_dict(dict(values))
    _refuse_unknown(name, values, cls)
    values = dict(values)
    if "stages" in values:
        values["stages"] = tuple(_stage_from(s) for s in values["stages"])
    if "crop_scale" in values and isinstance(values["crop_scale"], list):
        values["crop_scale"] = tuple(values["crop_scale"])
    return cls(**values)


def _set_path(node: Any, path: list[str], value: Any, where: str = "") -> Any:
    """``node`` with the field at ``path`` set to ``value`` (each level a frozen dataclass or,
    for stages, a tuple indexed by number), checked by the level's own validation; errors name
    the whole path, ``where``."""
    where = where or ".".join(path)
    head, rest = path[0], path[1:]
    if isinstance(node, tuple):
        if not head.isdigit() or int(head) >= len(node):
            raise ValueError(f"{where}: no stage {head!r}; the schedule has stages 0..{len(node) - 1}")
        items = list(node)
        items[int(head)] = _set_path(items[int(head)], rest, value, where) if rest else _stage_from(value)
        return tuple(items)
    if not dataclasses.is_dataclass(node) or head not in {f.name for f in fields(node)}:
        known = [f.name for f in fields(node)] if dataclasses.is_dataclass(node) else []
        raise ValueError(f"{where}: unknown setting {head!r}; known: {known}")
    if head in ("name", "overrides", "description") and isinstance(node, Recipe):
        raise ValueError(f"{where}: not a setting (give the recipe's groups)")
    if rest:
        value = _set_path(getattr(node, head), rest, value, where)
    elif head in _GROUPS and isinstance(node, Recipe):
        value = _group_from(head, value)
    elif head == "stages":
        value = tuple(_stage_from(s) for s in value)
    elif isinstance(node, Schedule) and head in ("steps", "epochs") and value is not None:
        other = "epochs" if head == "steps" else "steps"  # a run's length is one or the other
        return _replace(node, where, **{head: value, other: None})
    return _replace(node, where, **{head: value})


def _replace(node: Any, where: str, **values: Any) -> Any:
    try:
        return dataclasses.replace(node, **values)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from err
    except ValueError as err:  # a stage's own check names the stage's field, not the path given
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {err}") from err


_REGISTRY: dict[str, Callable[[], Recipe]] = {}


def register_recipe(make: Callable[[], Recipe]) -> Callable[[], Recipe]:
    """Register a function returning a :class:`Recipe` under the recipe's name (a decorator)."""
    name = make().name
    if name in _REGISTRY or name == "auto":
        raise ValueError(f"recipe: {name!r} is already a recipe name")
    _REGISTRY[name] = make
    return make


def list_recipes() -> list[str]:
    """The registered recipe names (``"auto"`` picks one of them).

    Example:
        >>> list_recipes()
        ['cifar', 'paper', 'small', 'timm']
    """
    return sorted(_REGISTRY)


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"recipe: unknown recipe {name!r}; known: {['auto', *list_recipes()]}")
    return _REGISTRY[name]()


def has_linear_head(classifier: object) -> bool:
    """Whether ``classifier`` is a timm model whose head is one linear layer (``get_classifier()``)."""
    cfg = getattr(classifier, "pretrained_cfg", None)
    get = getattr(classifier, "get_classifier", None)
    return (isinstance(classifier, nn.Module) and isinstance(cfg, dict) and bool(cfg.get("architecture"))
            and callable(get) and isinstance(get(), nn.Linear))


def resolve_recipe(recipe: str | Recipe, classifier: object) -> Recipe:
    """``recipe`` as a :class:`Recipe`: a name, or ``"auto"``, which picks ``"timm"`` for a timm
    classifier with a linear head and ``"small"`` otherwise, and logs its pick."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        _fail("recipe", "a recipe name or a Recipe", recipe)
    if recipe != "auto":
        return get_recipe(recipe)
    name = "timm" if has_linear_head(classifier) else "small"
    why = "a timm classifier with a linear head" if name == "timm" else "not a timm classifier with a linear head"
    logger.info("recipe 'auto' picked %r: the classifier is %s", name, why)
    return get_recipe(name)


@register_recipe
def _timm() -> Recipe:
    return Recipe(
        name="timm", description="a timm classifier's own frozen features, class filter made from its head",
        model=ModelSettings(encoder="classifier", class_embedding="classifier_head", presence_std_threshold=2.0),
        # area weight 32, not 16: tighter masks, whose boxes keep the class (research/log/2026-12-07-timm-recipe-user-classifier.md)
        objective=SaliencyObjective(preserve_weight=1.0, area_weight=32.0),
        # the half-resolution stage at a lighter area weight: from scratch at 32, masks for a 1000-class
        # classifier collapsed (research/log/2026-12-07-timm-recipe-user-classifier.md)
        schedule=Schedule(stages=(MaskStage(0.65, filter="fixed", resolution=0.5, area_weight=8.0),
                                  MaskStage(0.35, filter="fixed")),
                          steps=1000, batch_size=32),
        sampling=Sampling(class_source="prediction", crop_scale=(0.35, 1.0)),
    )


@register_recipe
def _cifar() -> Recipe:
    return Recipe(
        name="cifar", description="small random-init encoder; long class embedding stage, then kept fixed",
        model=ModelSettings(encoder="small", encoder_kwargs={"widths": [32, 64, 128]}, mask_reduction=2),
        objective=SaliencyObjective(preserve_weight=1.0),
        schedule=Schedule(stages=(EmbeddingStage(8 / 11), MaskStage(3 / 11, filter="fixed")), epochs=11),
        sampling=Sampling(fake_label_prob=0.5),
    )


@register_recipe
def _small() -> Recipe:
    return Recipe(
        name="small", description="small random-init encoder; the class filter reads its own copy, trained on presence",
        model=ModelSettings(encoder="small", mask_reduction=2, gate_encoder=True),
        schedule=Schedule(stages=(EmbeddingStage(0.25, removed_peak_weight=1.0), MaskStage(0.75, filter="presence_only")),
                          epochs=20),
    )


@register_recipe
def _paper() -> Recipe:
    return Recipe(
        name="paper", description="the paper's settings as written (ResNet-50 encoder, pretrained weights)",
        model=ModelSettings(encoder="resnet50", class_filter="bottleneck"),
        objective=SaliencyObjective.paper(),
        schedule=Schedule(stages=(MaskStage(1.0, filter="learns"),), epochs=20),
    )
