"""``Explainer``: a trained masking model, and ``ExplainerConfig``, the plain-JSON config that
rebuilds it.

The explainer is a ``huggingface_hub.PyTorchModelHubMixin`` (as segmentation_models.pytorch's
models are): ``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` are the mixin's, with
the model card generated through its ``generate_model_card``. They are stricter here than the
mixin's defaults: safetensors only (no ``pytorch_model.bin`` fallback), weights loaded strictly,
``config.json`` checked against :class:`ExplainerConfig` before any model is built, every file
written atomically, and errors that name the argument at fault.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin
from torch import nn

from . import hub
from ._validation import ClassIds, check_class_ids, check_images
from .encoders import DEFAULT_ENCODER, build_encoder
from .masking_model import CLASS_EMBEDDINGS, CLASS_FILTERS, MaskingModel, MaskOutput

__all__ = ["Explainer", "ExplainerConfig", "ClassifierInfo"]

CONFIG_FORMAT = "blackbox-saliency-explainer"
CONFIG_VERSION = 1


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_SMALL_OPTIONS = {"widths", "layers_per_block"}
# plain sizes only; the last four shape a ViT encoder and its pyramid (encoders.SimpleFeaturePyramid)
_TIMM_OPTIONS = {"out_indices", "output_stride", "img_size", "patch_size", "depth", "embed_dim", "num_heads",
                 "pyramid_channels"}


def _check_json(value: object, where: str) -> None:
    """Refuse, naming ``where``, a value that ``config.json`` could not hold."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: must be plain JSON (dicts, lists, text, numbers, booleans, null): {err}") from err


def _number_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


@dataclass
class ClassifierInfo:
    """Plain facts about the classifier an explainer explains; each may be unknown (None).

    Attributes:
        name: what it is, for people (e.g. ``"efficientnet_lite0 (timm)"``).
        input_size: ``[C, H, W]`` of the images it takes; ``explain`` refuses other sizes.
        mean, std: its input normalisation, per channel (or a sentence when there is none).
        class_names: a name per class, in class-id order.
    """

    name: str | None = None
    input_size: list[int] | None = None
    mean: list[float] | str | None = None
    std: list[float] | str | None = None
    class_names: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The facts that are known (unknown ones are left out, not written as null)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, values: object, where: str = "classifier") -> "ClassifierInfo":
        """From a dict as written by :meth:`to_dict` (tuples are taken as lists); errors name ``where``."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: must be an object (a dict), got {values!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {known}")
        info = cls(**{k: list(v) if isinstance(v, tuple) else copy.deepcopy(v) for k, v in values.items()})
        info.validate(where)
        return info

    def validate(self, where: str = "classifier") -> None:
        """Check each fact's type: ``input_size`` three positive ints, ``mean``/``std`` numbers or
        a sentence, ``class_names`` texts."""
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"{where}: name must be a text, got {self.name!r}")
        size = self.input_size
        if size is not None and not (isinstance(size, list) and len(size) == 3 and _number_list(size)
                                     and all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError(f"{where}: input_size must be [C, H, W], three positive ints, got {size!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str) and not _number_list(value):
                raise ValueError(f"{where}: {key} must be a list of numbers (or a text), got {value!r}")
        names = self.class_names
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{where}: class_names must be a list of texts, got {names!r}")


#: What a config written before a field existed means: explainers saved before ``class_filter``
#: filtered the bottleneck only, before ``class_embedding`` learned one vector per class, and
#: before ``presence_reference`` and ``presence_std_threshold`` left class scores as they were.
OLD_CONFIG_DEFAULTS: dict[str, Any] = {"class_filter": "bottleneck", "class_embedding": "learned",
                                       "class_embedding_features": None, "presence_reference": None,
                                       "presence_std_threshold": None, "gate_encoder": False}


def _setting(types: tuple[type, ...], default: Any = MISSING, *, factory: Any = MISSING, model: bool = True) -> Any:
    """An architecture field: its default (the only place it is written), the JSON types
    ``config.json`` must give it, and whether :class:`MaskingModel` takes it by that name."""
    return field(default=default, default_factory=factory, metadata={"types": types, "model": model})


@dataclass
class ExplainerConfig:
    """Everything that rebuilds an explainer, and what is known about it: the one config object,
    saved as ``config.json`` (plus ``"format"`` and ``"version"``). Its fields and their
    defaults are the explainer's settings; :class:`Explainer` takes any of them by name.

    Attributes:
        num_classes: classes of the classifier it explains.
        encoder: ``"small"`` (default; the paper's CIFAR variant, random init) or a timm model
            name (``features_only``); built with ``encoder_kwargs`` (plain JSON) and ``in_chans``.
        mask_reduction: the mask's resolution is the input's divided by this (default 4).
        width_multiplier: decoder channels relative to the encoder's (default 0.75).
        num_bottlenecks: bottleneck blocks per upsampler; None (default) gives 1 for ``"small"``,
            3 otherwise.
        freeze_encoder: keep the encoder fixed in training; None (default) freezes a pretrained
            encoder or a handed-in module.
        class_filter: ``"all"`` (default) filters the skip connections by the class as well as
            the bottleneck; ``"bottleneck"`` is the paper's (see :class:`MaskingModel`).
        class_embedding: ``"learned"`` (default, the paper's: one vector per class) or
            ``"classifier_head"``: a trained linear map of the classifier's head row for each
            class, so classes the training images lack still get one; needs
            ``class_embedding_features``, the head's input width.
        presence_reference: None (default) or each image's class scores centred on this value
            (see :meth:`Explainer.centre_presence`).
        presence_std_threshold: None (default) or ``t``: standardise each image's class scores
            and call a class present ``t`` deviations above their mean; not with
            ``presence_reference``.
        gate_encoder: the class filter reads its own copy of a trainable encoder, so training can
            keep the filter as its embedding stage left it (default False).
        objective: the objective's settings (:meth:`SaliencyObjective.to_dict`).
        classifier: facts about the classifier it explains (:class:`ClassifierInfo`).
        training, training_data, evaluation: free-form plain JSON for people and the model card
            (``evaluation`` as markdown text, or ``{"data": ..., "results": [rows]}`` for a
            table); None means not recorded, and is left out of the file.

    Example:
        >>> config = Explainer(num_classes=10, classifier_info={"input_size": [3, 32, 32]}).config
        >>> config.classifier.input_size, config.encoder, config.to_dict()["format"]
        ([3, 32, 32], 'small', 'blackbox-saliency-explainer')
        >>> ExplainerConfig.from_dict(config.to_dict()) == config
        True
    """

    num_classes: int = _setting((int,))
    encoder: str = _setting((str,), DEFAULT_ENCODER, model=False)
    encoder_kwargs: dict[str, Any] = _setting((dict,), factory=dict, model=False)
    in_chans: int = _setting((int,), 3, model=False)
    mask_reduction: int = _setting((int,), 4)
    width_multiplier: float = _setting((int, float), 0.75)
    num_bottlenecks: int | None = _setting((int,), None)
    freeze_encoder: bool | None = _setting((bool,), None)
    class_filter: str = _setting((str,), "all")
    class_embedding: str = _setting((str,), "learned")
    class_embedding_features: int | None = _setting((int, type(None)), None)
    presence_reference: float | None = _setting((int, float, type(None)), None)
    presence_std_threshold: float | None = _setting((int, float, type(None)), None)
    gate_encoder: bool = _setting((bool,), False)
    objective: dict[str, Any] = _setting((dict,), factory=dict, model=False)
    classifier: ClassifierInfo = field(default_factory=ClassifierInfo)
    training: dict[str, Any] | None = None
    training_data: Any = None
    evaluation: Any = None

    @classmethod
    def create(cls, num_classes: int, encoder: str | nn.Module = DEFAULT_ENCODER, *,
               classifier_info: dict[str, Any] | ClassifierInfo | None = None, pretrained_encoder: bool = False,
               **settings: Any) -> "ExplainerConfig":
        """The config of a new explainer: ``settings`` are fields of this class by name, the
        defaults that depend on the encoder are filled in, and every value must be plain JSON
        (the Hub mixin would otherwise leave it out of the saved config without a word).

        Example:
            >>> ExplainerConfig.create(10, "small").num_bottlenecks
            1
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
        names = [f.name for f in fields(cls) if f.metadata and f.name not in ("num_classes", "encoder")]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"{', '.join(unknown)}: not an explainer setting; the settings are {names}")
        built_with = getattr(encoder, "timm_kwargs", None) if isinstance(encoder, nn.Module) else None
        settings["encoder_kwargs"] = copy.deepcopy({**(built_with or {}), **dict(settings.get("encoder_kwargs") or {})})
        settings["objective"] = copy.deepcopy(dict(settings.get("objective") or {}))
        for key in ("encoder_kwargs", "objective"):
            _check_json(settings[key], key)
        if isinstance(classifier_info, ClassifierInfo):
            info = copy.deepcopy(classifier_info)
            info.validate("classifier_info")
        else:
            info = ClassifierInfo.from_dict(classifier_info or {}, where="classifier_info")
        name = encoder if isinstance(encoder, str) else _timm_name(encoder) or f"custom:{type(encoder).__name__}"
        if settings.get("num_bottlenecks") is None:
            settings["num_bottlenecks"] = 1 if name == "small" else 3
        if settings.get("freeze_encoder") is None:
            settings["freeze_encoder"] = bool(pretrained_encoder and name != "small") or isinstance(encoder, nn.Module)
        return cls(num_classes=num_classes, encoder=name, classifier=info, **settings)

    def model_kwargs(self) -> dict[str, Any]:
        """The fields :class:`MaskingModel` takes, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("model")}

    def to_dict(self) -> dict[str, Any]:
        """The config as ``config.json`` holds it: plain JSON, unknown metadata left out."""
        values: dict[str, Any] = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ClassifierInfo):
                value = value.to_dict()
            if value is not None or f.metadata:
                values[f.name] = value
        return json.loads(json.dumps(values))

    def to_json(self) -> str:
        """The text of ``config.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: object) -> "ExplainerConfig":
        """From a dict as written by :meth:`to_dict` (e.g. read from ``config.json``), checked
        against the schema (:meth:`validate`) before it is returned: not a model is built
        from a config that fails."""
        if not isinstance(values, dict) or values.get("format") != CONFIG_FORMAT:
            raise ValueError(f"config: not a blackbox-saliency explainer config (format != {CONFIG_FORMAT!r})")
        if values.get("version") != CONFIG_VERSION:
            raise ValueError(f"config: unsupported version {values.get('version')!r}, expected {CONFIG_VERSION}")
        values = {k: v for k, v in values.items() if k not in ("format", "version")}
        values = {**OLD_CONFIG_DEFAULTS, **values}
        required = [f.name for f in fields(cls) if f.metadata]  # a saved config spells out its architecture
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"config: missing key(s) {missing}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        cls._check_types(values)
        values["classifier"] = ClassifierInfo.from_dict(values.get("classifier", {}), where="config: classifier")
        config = cls(**copy.deepcopy(values))
        config.validate()
        return config

    @classmethod
    def _check_types(cls, values: dict[str, Any]) -> None:
        for f in fields(cls):
            types = f.metadata.get("types")
            if types and f.name in values:
                value = values[f.name]
                if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                    raise ValueError(f"config: {f.name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")

    def validate(self) -> None:
        """Refuse a config that could not rebuild this explainer, or could do harm: wrong types,
        out-of-range sizes, an unknown encoder architecture, encoder options beyond an
        allow-list (timm's ``checkpoint_path`` would load a file a stranger's config names),
        unknown objective settings, classifier facts of the wrong shape, non-JSON metadata."""
        self._check_types({f.name: getattr(self, f.name) for f in fields(self)})
        if self.num_classes < 2 or self.in_chans < 1 or self.mask_reduction < 1 or self.num_bottlenecks < 0:
            raise ValueError("config: num_classes, in_chans, mask_reduction or num_bottlenecks out of range")
        if self.encoder.startswith("custom:"):
            raise ValueError("config: the explainer was built on a hand-made encoder module and cannot be rebuilt")
        if self.encoder != "small":
            import timm

            if not timm.is_model(self.encoder):
                raise ValueError(f"config: unknown encoder architecture {self.encoder!r}")
        allowed = _SMALL_OPTIONS if self.encoder == "small" else _TIMM_OPTIONS
        unknown = sorted(set(self.encoder_kwargs) - allowed)
        if unknown:
            raise ValueError(f"config: encoder_kwargs {unknown} are not allowed; allowed: {sorted(allowed)}")
        if self.class_filter not in CLASS_FILTERS:
            raise ValueError(f"config: class_filter must be one of {CLASS_FILTERS}, got {self.class_filter!r}")
        if self.class_embedding not in CLASS_EMBEDDINGS:
            raise ValueError(f"config: class_embedding must be one of {CLASS_EMBEDDINGS}, got {self.class_embedding!r}")
        features = self.class_embedding_features
        if (self.class_embedding == "classifier_head") != (features is not None) or (features is not None and features < 1):
            raise ValueError(f"config: class_embedding_features must be the head's width (an int >= 1) with "
                             f"class_embedding 'classifier_head' and null otherwise, got {features!r}")
        for name in ("presence_reference", "presence_std_threshold"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"config: {name} must be a finite number or null, got {value!r}")
        if self.presence_reference is not None and self.presence_std_threshold is not None:
            raise ValueError("config: presence_reference and presence_std_threshold cannot both be set")
        if not isinstance(self.classifier, ClassifierInfo):
            raise ValueError(f"config: classifier must be a ClassifierInfo, got {self.classifier!r}")
        self.classifier.validate("config: classifier")
        size = self.classifier.input_size
        if size is not None and size[0] != self.in_chans:
            raise ValueError(f"config: classifier input_size {size} does not have in_chans={self.in_chans} channels")
        if self.training is not None and not isinstance(self.training, dict):
            raise ValueError(f"config: training must be an object (a dict), got {self.training!r}")
        for key in ("encoder_kwargs", "objective", "training", "training_data", "evaluation"):
            _check_json(getattr(self, key), f"config: {key}")
        from .objective import SaliencyObjective

        SaliencyObjective.from_dict(self.objective)


class Explainer(
    nn.Module,
    PyTorchModelHubMixin,
    library_name=hub.LIBRARY_NAME,
    license=hub.LICENSE,
    pipeline_tag=hub.PIPELINE_TAG,
    tags=list(hub.TAGS),
    repo_url=hub.REPO_URL,
):
    """Produces a saliency mask for an image and a class in one forward pass.

    An explainer belongs to the classifier it was trained against: masks say what *that*
    classifier needs. Build one with :func:`blackbox_saliency.fit_explainer`, or load one with
    :meth:`from_pretrained`. Its settings and what is known about it are in :attr:`config`
    (an :class:`ExplainerConfig`).

    Args:
        num_classes: classes of the classifier it explains.
        encoder: ``"small"`` (default), a timm model name, or an ``nn.Module`` feature pyramid
            (timm ``features_only=True`` or similar).
        config: an :class:`ExplainerConfig` to build from, instead of the arguments.
        pretrained_encoder: load timm's weights for a named encoder.
        classifier_info: plain facts about the classifier (name, input size, normalisation,
            class names): a dict or a :class:`ClassifierInfo`, kept in the config.
        **settings: any other field of :class:`ExplainerConfig` (``mask_reduction``,
            ``class_filter``, ``objective``...), with its defaults.

    Arguments that ``config.json`` could not hold are refused here, by name: the Hub mixin
    would otherwise leave them out of the saved config without a word.

    Example:
        >>> explainer = Explainer(num_classes=10, encoder="small", encoder_kwargs={"widths": [8, 16, 32]})
        >>> explainer.eval()(torch.randn(2, 3, 32, 32), [3, 5]).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, num_classes: int | None = None, encoder: str | nn.Module = DEFAULT_ENCODER, *,
                 config: ExplainerConfig | None = None, pretrained_encoder: bool = False,
                 classifier_info: dict[str, Any] | ClassifierInfo | None = None, **settings: Any):
        super().__init__()
        if config is None:
            if num_classes is None:
                raise TypeError("num_classes: required (or give config)")
            config = ExplainerConfig.create(num_classes, encoder, classifier_info=classifier_info,
                                            pretrained_encoder=pretrained_encoder, **settings)
        elif num_classes is not None or settings or classifier_info is not None:
            raise TypeError("config: give a config or the explainer's settings, not both")
        else:
            config = copy.deepcopy(config)
        module = encoder if isinstance(encoder, nn.Module) else config.encoder
        pretrained = pretrained_encoder and config.encoder != "small"  # the CIFAR variant always starts random
        self.masking_model = MaskingModel(build_encoder(module, pretrained=pretrained, in_chans=config.in_chans,
                                                        **config.encoder_kwargs), **config.model_kwargs())
        self.config = config

    # The mixin keeps the config it saves in ``_hub_mixin_config``, built from the constructor's
    # JSON-able arguments (others silently left out). Here it is the ExplainerConfig itself:
    # one config object, never a second, lossy copy.
    @property
    def config(self) -> ExplainerConfig:
        """Settings that rebuild this explainer and what is known about it (saved as ``config.json``)."""
        return self._hub_mixin_config

    @config.setter
    def config(self, value: ExplainerConfig) -> None:
        if not isinstance(value, ExplainerConfig):
            raise TypeError(f"config: expected an ExplainerConfig, got {type(value).__name__}")
        self._hub_mixin_config = value

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def masks_with_details(self, images: torch.Tensor, class_ids: torch.Tensor) -> MaskOutput:
        """The masking model's full output on already-checked inputs (used in training)."""
        return self.masking_model(images, class_ids)

    @torch.no_grad()
    def centre_presence(self, images: torch.Tensor, batch_size: int = 50) -> float:
        """Centre the class filter's scores on ``images`` (training images, as the classifier
        takes them), in place, and return the reference: the mean over ``images`` of each
        image's mean class score ``max_ij X_ij^T C_k``. From then on every image's scores are
        shifted by its own mean less this reference, so on images like these nothing moves
        much, and on another kind (sharp photographs after blurry training images) the filter
        does not call most classes present (measured in docs/objective.md). Recorded in
        ``config.presence_reference``, so it is saved and loaded with the explainer.

        Example:
            >>> explainer = Explainer(num_classes=10, encoder="small", encoder_kwargs={"widths": [8, 16, 32]})
            >>> reference = explainer.centre_presence(torch.randn(4, 3, 32, 32))
            >>> explainer.config.presence_reference == reference
            True
        """
        if self.config.presence_std_threshold is not None:
            raise ValueError("centre_presence: this explainer standardises its class scores "
                             f"(presence_std_threshold {self.config.presence_std_threshold}); centring would replace that")
        images = check_images(images, channels=self.config.in_chans, min_size=self.config.mask_reduction)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        model, was_training = self.masking_model, self.training
        self.eval()
        param = next(self.parameters())
        try:
            means = [model.feature_filter.raw_class_logits(model.gate_features(chunk.to(param.device, param.dtype)))
                     .float().mean(1) for chunk in images.split(batch_size)]
        finally:
            self.train(was_training)
        reference = torch.cat(means).mean().item()
        if not math.isfinite(reference):
            raise ValueError(f"images: the class scores on them are not finite ({reference})")
        model.feature_filter.presence_reference = reference
        self.config.presence_reference = reference
        return reference

    def for_inference(self, dtype: torch.dtype | None = None, channels_last: bool = False,
                      compile: bool | str = False) -> "Explainer":
        """Set the explainer up for fast inference, in place: eval mode, weights in ``dtype``
        (``torch.bfloat16`` or ``torch.float16``; inputs are cast to it, masks come back in
        float32), channels-last memory layout, and ``torch.compile`` of the masking model
        (``compile=True``, or a ``torch.compile`` mode: ``"reduce-overhead"`` replays CUDA
        graphs, which cuts single-image latency on a GPU when the input shape repeats).

        Measured tolerances against float32 are in ``docs/speed.md``; half precision is meant
        for GPUs (on a CPU it is usually slower).

        Example:
            >>> explainer = Explainer(num_classes=10, encoder="small").for_inference(dtype=torch.bfloat16)
        """
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if not isinstance(compile, bool) and compile not in _COMPILE_MODES:
            raise ValueError(f"compile: expected True, False or one of {_COMPILE_MODES}, got {compile!r}")
        self.eval()
        if dtype is not None:
            self.to(dtype)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self._channels_last = channels_last
        if compile:
            mode = None if compile is True else compile
            self.masking_model.forward = torch.compile(self.masking_model.forward, mode=mode)
        return self

    def forward(self, images: torch.Tensor, class_ids: ClassIds) -> torch.Tensor:
        """Masks ``(N, 1, H, W)`` in ``[0, 1]`` for ``images`` (as the classifier takes them) and
        ``class_ids`` (an int, a list or a ``(N,)`` tensor); 1 keeps evidence, 0 removes it.
        Runs on the explainer's device and returns on the images' device."""
        images = check_images(images, channels=self.config.in_chans, min_size=self.config.mask_reduction)
        ids = check_class_ids(class_ids, images.shape[0], self.num_classes)
        size = self.config.classifier.input_size
        if size and list(images.shape[1:]) != list(size) and not getattr(self, "_warned_size", False):
            # fully convolutional, so it runs; but it learnt its classifier at one size (explain refuses)
            self._warned_size = True
            warnings.warn(
                f"images: this explainer was trained for inputs of shape {tuple(size)}, got {tuple(images.shape[1:])}; "
                "its masks at another size are not what it learnt (preprocess as for its classifier)", stacklevel=2)
        return self._masks(images, ids)

    def _masks(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``forward`` without its checks, for callers that have made them (``explain``
        checks the whole batch once, then runs it a chunk at a time)."""
        param = next(self.parameters())
        x = images.to(param.device, param.dtype)
        if getattr(self, "_channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.masking_model(x, ids.to(param.device))
        return out.mask.to(images.device)

    # ---- files and the Hub (huggingface_hub.PyTorchModelHubMixin, made stricter) ------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, config: None = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None,
                        **push_to_hub_kwargs: Any) -> str | None:
        """Write ``config.json``, ``model.safetensors`` and a model card ``README.md`` into
        ``save_directory`` (``repo_id`` goes into the card's usage example); with
        ``push_to_hub=True``, then upload them to ``repo_id`` (see :meth:`push_to_hub`).

        The mixin's ``save_pretrained``, made safe to repeat on a folder in use: the config is
        checked first (a folder that cannot be loaded is never written), and each file is
        replaced atomically, so a reader or a crash never sees half a file, a folder without
        its config, or a stale card. The config saved is always :attr:`config`.
        """
        if config is not None:
            raise ValueError("config: an explainer saves its own config; change explainer.config instead")
        if self.config.encoder.startswith("custom:"):
            raise ValueError(
                "encoder: an explainer built on a hand-made encoder module cannot be rebuilt from its "
                "config; use a timm name or 'small' to save it"
            )
        self.config.validate()
        card_kwargs = dict(model_card_kwargs or {})
        if repo_id is not None:
            card_kwargs["repo_id"] = repo_id
        card = self.generate_model_card(**card_kwargs)
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(folder)
        _atomic_write(folder / hub.CONFIG_NAME, lambda p: p.write_text(self.config.to_json(), encoding="utf-8"))
        _atomic_write(folder / hub.CARD_NAME, lambda p: card.save(p))
        if push_to_hub:
            return self.push_to_hub(repo_id or folder.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        """The weights, as ``model.safetensors``, written atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic_write(save_directory / hub.WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))

    def generate_model_card(self, repo_id: str | None = None) -> ModelCard:
        """The model card: the mixin's card data (``library_name``, tags, licence, pipeline tag)
        as its header, then what this explainer explains, its training and evaluation, and
        usage (loading ``repo_id`` when given)."""
        info = self._hub_mixin_info
        data = ModelCardData(**info.model_card_data.to_dict())
        return ModelCard(hub.model_card(self.config, data, repo_id=repo_id, repo_url=info.repo_url))

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload blackbox-saliency explainer",
                    private: bool | None = None, token: str | None = None,
                    model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """Upload config, weights and model card to the Hub repo ``repo_id`` (``owner/name``,
        created if needed) in one commit; returns the commit URL. The mixin's ``push_to_hub``
        (``branch``, ``create_pr`` and the other options pass through), with the card's usage
        example loading ``repo_id``."""
        problem = hub.repo_id_problem(repo_id) if isinstance(repo_id, str) else "not a text"
        if problem:
            raise ValueError(f"repo_id: not a Hub repo id 'owner/name': {repo_id!r} ({problem})")
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        commit = super().push_to_hub(repo_id, commit_message=commit_message, private=private, token=token,
                                     model_card_kwargs=card_kwargs, **kwargs)
        return str(getattr(commit, "commit_url", commit))

    @classmethod
    def from_config(cls, config: ExplainerConfig | dict[str, Any]) -> "Explainer":
        """Build an (untrained) explainer from an :class:`ExplainerConfig`, or the dict of a
        ``config.json``, after checking it against the schema."""
        if isinstance(config, ExplainerConfig):
            config.validate()
        else:
            config = ExplainerConfig.from_dict(config)
        return cls(config=config)

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
        force_download: bool = False,
        local_files_only: bool = False,
    ) -> "Explainer":
        """Load an explainer from a folder or a Hugging Face Hub repo id (``"owner/name"``,
        at ``revision``), as written by :meth:`save_pretrained`: safetensors only, config
        checked before any model is built, weights loaded strictly, then the model moved to
        ``map_location``. A repo is downloaded once into the Hub cache; with
        ``HF_HUB_OFFLINE=1`` (or ``local_files_only``) only the cache is used.

        The mixin's ``from_pretrained`` reads the config and builds the model; this one first
        finds the files (a folder of pickles is refused, saying why) and names the argument at
        fault in every error.

        Example:
            >>> explainer = Explainer.from_pretrained("blackbox-saliency/explainer-efficientnet_lite0")  # doctest: +SKIP
        """
        try:
            device = torch.device(map_location)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"map_location: not a device: {map_location!r}") from err
        folder = hub.resolve_folder(name_or_folder, revision=revision, cache_dir=cache_dir, token=token,
                                    force_download=force_download, local_files_only=local_files_only)
        # Read here too so that a malformed file gets an error naming the argument; the mixin
        # reads it again and hands it to _from_pretrained, which checks it before building.
        config_path = folder / hub.CONFIG_NAME
        try:
            ExplainerConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"name_or_folder: {config_path} is not valid JSON ({err})") from err
        return super().from_pretrained(str(folder), map_location=device)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config: dict[str, Any] | None = None,
                         map_location: str | torch.device = "cpu", **ignored: Any) -> "Explainer":
        """Build from ``config`` (checked first) and load the folder's safetensors weights
        strictly. The mixin also passes the config's entries that match constructor arguments,
        and its download options; they are ``ignored``: the model is built from the checked
        config alone, and :meth:`from_pretrained` has already found the files."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = hub.check_folder(Path(model_id))
        explainer = cls.from_config(config if config is not None else {})
        weights_path = folder / hub.WEIGHTS_NAME
        try:
            state = load_file(str(weights_path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"name_or_folder: {weights_path} is not a readable safetensors file ({err})") from err
        try:
            explainer.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"name_or_folder: weights in {weights_path} do not match its config: {err}") from err
        return explainer.to(map_location).eval()

    @classmethod
    def _load_as_pickle(cls, *args: Any, **kwargs: Any) -> "Explainer":
        """Never: a pickle can run arbitrary code (the mixin's fallback for ``pytorch_model.bin``)."""
        raise ValueError("pickle checkpoints are refused because loading a pickle can run arbitrary code; "
                         f"only {hub.WEIGHTS_NAME} is loaded")

    def export_onnx(self, path: str | os.PathLike, input_size: tuple[int, int, int] | None = None) -> Path:
        """Export the masking model to ONNX for deployment without PyTorch (the ``onnx`` extra).

        Inputs ``images`` (float32 ``(N, C, H, W)``, as the classifier takes them) and
        ``class_ids`` (int64 ``(N,)``); output ``masks`` (``(N, 1, H, W)``). The batch size is
        free, the image size fixed: ``input_size = (C, H, W)``, by default the classifier's
        input size from the config.

        Example:
            >>> explainer.export_onnx("explainer.onnx")  # doctest: +SKIP
        """
        size = input_size or self.config.classifier.input_size
        if not size or len(size) != 3:
            raise ValueError("input_size: give (C, H, W); the config records no classifier input size")
        try:
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError as err:
            raise ImportError("export_onnx needs onnx and onnxscript: pip install 'blackbox-saliency[onnx]'") from err
        path = Path(path)
        param = next(self.parameters())
        images = torch.zeros(2, *size, device=param.device)
        class_ids = torch.zeros(2, dtype=torch.long, device=param.device)
        batch = torch.export.Dim("batch")
        was_training = self.training
        self.eval()
        try:
            torch.onnx.export(
                _MaskOnly(self.masking_model).eval(), (images, class_ids), str(path), input_names=["images", "class_ids"],
                output_names=["masks"], dynamic_shapes={"images": {0: batch}, "class_ids": {0: batch}}, dynamo=True,
                verbose=False,
            )
        finally:
            self.train(was_training)
        return path


def _timm_name(module: nn.Module) -> str | None:
    """The timm architecture of a feature-pyramid module timm built, if it is one: its weights
    are saved with the explainer's, so the name is all the config needs to rebuild it."""
    cfg = getattr(module, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    if name:
        import timm

        if timm.is_model(name):
            return name
    return None


class _MaskOnly(nn.Module):
    """The masking model with only the mask as output, for export."""

    def __init__(self, model: MaskingModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self.model(images, class_ids).mask


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a reader (or a crash)
    never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
