"""``Explainer``: a trained masking model with the plain-JSON config that rebuilds it."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._validation import ClassIds, check_class_ids, check_images
from .encoders import DEFAULT_ENCODER, build_encoder
from .masking_model import CLASS_FILTERS, MaskingModel, MaskOutput

__all__ = ["Explainer", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_FORMAT = "blackbox-saliency-explainer"
CONFIG_VERSION = 1


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Explainer(nn.Module):
    """Produces a saliency mask for an image and a class in one forward pass.

    An explainer belongs to the classifier it was trained against: masks say what *that*
    classifier needs. Build one with :func:`blackbox_saliency.fit_explainer`, or load one with
    :meth:`from_pretrained`.

    Args:
        num_classes: classes of the classifier it explains.
        encoder: ``"small"`` (default; the paper's CIFAR variant, random init), a timm model name, or an
            ``nn.Module`` feature pyramid (timm ``features_only=True`` or similar).
        pretrained_encoder: load timm's weights for a named encoder.
        encoder_kwargs: passed to the encoder's constructor (e.g. ``{"widths": [32, 64, 128]}``).
        num_bottlenecks: bottleneck blocks per upsampler; default 1 for ``"small"``, 3 otherwise.
        freeze_encoder: keep the encoder fixed in training; default: when it is pretrained or
            handed in as a module.
        classifier_info: plain facts about the classifier (name, input size, normalisation,
            class names), kept in the config.
        class_filter: ``"all"`` (default) filters the skip connections by the class as well as
            the bottleneck; ``"bottleneck"`` is the paper's (see :class:`MaskingModel`).

    Example:
        >>> explainer = Explainer(num_classes=10, encoder="small", encoder_kwargs={"widths": [8, 16, 32]})
        >>> explainer.eval()(torch.randn(2, 3, 32, 32), [3, 5]).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str | nn.Module = DEFAULT_ENCODER,
        pretrained_encoder: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
        in_chans: int = 3,
        mask_reduction: int = 4,
        width_multiplier: float = 0.75,
        num_bottlenecks: int | None = None,
        freeze_encoder: bool | None = None,
        objective: dict[str, float] | None = None,
        classifier_info: dict[str, Any] | None = None,
        class_filter: str = "all",
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
        encoder_kwargs = dict(encoder_kwargs or {})
        if encoder == "small":
            pretrained_encoder = False  # the CIFAR variant is always trained from random init
        encoder_name = encoder if isinstance(encoder, str) else _timm_name(encoder) or f"custom:{type(encoder).__name__}"
        module = build_encoder(encoder, pretrained=pretrained_encoder, in_chans=in_chans, **encoder_kwargs)
        if num_bottlenecks is None:
            num_bottlenecks = 1 if encoder == "small" else 3
        if freeze_encoder is None:
            freeze_encoder = bool(pretrained_encoder) or isinstance(encoder, nn.Module)
        self.masking_model = MaskingModel(
            module, num_classes, mask_reduction, width_multiplier, num_bottlenecks, freeze_encoder, class_filter
        )
        self.config: dict[str, Any] = {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "num_classes": num_classes,
            "encoder": encoder_name,
            "encoder_kwargs": encoder_kwargs,
            "in_chans": in_chans,
            "mask_reduction": mask_reduction,
            "width_multiplier": width_multiplier,
            "num_bottlenecks": num_bottlenecks,
            "freeze_encoder": freeze_encoder,
            "class_filter": class_filter,
            "objective": dict(objective or {}),
            "classifier": dict(classifier_info or {}),
        }
        json.dumps(self.config)  # the config must stay plain JSON; fail here, not at save time

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def masks_with_details(self, images: torch.Tensor, class_ids: torch.Tensor) -> MaskOutput:
        """The masking model's full output on already-checked inputs (used in training)."""
        return self.masking_model(images, class_ids)

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
        images = check_images(images, channels=self.config["in_chans"], min_size=self.config["mask_reduction"])
        ids = check_class_ids(class_ids, images.shape[0], self.num_classes)
        size = (self.config.get("classifier") or {}).get("input_size")
        if size and list(images.shape[1:]) != list(size) and not getattr(self, "_warned_size", False):
            # fully convolutional, so it runs; but it learnt its classifier at one size (explain refuses)
            self._warned_size = True
            warnings.warn(
                f"images: this explainer was trained for inputs of shape {tuple(size)}, got {tuple(images.shape[1:])}; "
                "its masks at another size are not what it learnt (preprocess as for its classifier)", stacklevel=2)
        param = next(self.parameters())
        x = images.to(param.device, param.dtype)
        if getattr(self, "_channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.masking_model(x, ids.to(param.device))
        return out.mask.to(images.device)

    # ---- files and the Hub ----------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, repo_id: str | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and a model card ``README.md`` into
        ``folder`` (``repo_id`` goes into the card's usage example)."""
        from safetensors.torch import save_file

        from .hub import CARD_NAME, model_card

        if self.config["encoder"].startswith("custom:"):
            raise ValueError(
                "encoder: an explainer built on a hand-made encoder module cannot be rebuilt from its "
                "config; use a timm name or 'small' to save it"
            )
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        _atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(self.config, indent=2, sort_keys=True)))
        _atomic_write(folder / CARD_NAME, lambda p: p.write_text(model_card(self.config, repo_id)))
        return folder

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Explainer":
        """Build an (untrained) explainer from a config dict as written by :meth:`save_pretrained`,
        after checking it against the schema."""
        _validate_config(config)
        keys = ("num_classes", "encoder", "encoder_kwargs", "in_chans", "mask_reduction", "width_multiplier",
                "num_bottlenecks", "freeze_encoder", "objective")
        # explainers saved before class_filter existed filtered the bottleneck only
        explainer = cls(**{k: config[k] for k in keys}, pretrained_encoder=False, classifier_info=config.get("classifier"),
                        class_filter=config.get("class_filter", "bottleneck"))
        for key in ("training", "training_data", "evaluation"):
            if key in config:
                explainer.config[key] = config[key]
        return explainer

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | None = None,
        map_location: str | torch.device = "cpu",
    ) -> "Explainer":
        """Load an explainer from a folder or a Hugging Face Hub repo id (``"owner/name"``,
        at ``revision``), as written by :meth:`save_pretrained`: safetensors only, config
        checked before any model is built, weights loaded strictly, then the model moved to
        ``map_location``.

        Example:
            >>> explainer = Explainer.from_pretrained("blackbox-saliency/explainer-efficientnet_lite0")  # doctest: +SKIP
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .hub import resolve_folder

        folder = resolve_folder(name_or_folder, revision=revision, cache_dir=cache_dir, token=token)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"name_or_folder: {config_path} is not valid JSON ({err})") from err
        explainer = cls.from_config(config)
        try:
            device = torch.device(map_location)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"map_location: not a device: {map_location!r}") from err
        try:
            state = load_file(str(weights_path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"name_or_folder: {weights_path} is not a readable safetensors file ({err})") from err
        try:
            explainer.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"name_or_folder: weights in {weights_path} do not match its config: {err}") from err
        return explainer.to(device).eval()

    def export_onnx(self, path: str | os.PathLike, input_size: tuple[int, int, int] | None = None) -> Path:
        """Export the masking model to ONNX for deployment without PyTorch (the ``onnx`` extra).

        Inputs ``images`` (float32 ``(N, C, H, W)``, as the classifier takes them) and
        ``class_ids`` (int64 ``(N,)``); output ``masks`` (``(N, 1, H, W)``). The batch size is
        free, the image size fixed: ``input_size = (C, H, W)``, by default the classifier's
        input size from the config.

        Example:
            >>> explainer.export_onnx("explainer.onnx")  # doctest: +SKIP
        """
        size = input_size or (self.config.get("classifier") or {}).get("input_size")
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

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload blackbox-saliency explainer") -> str:
        """Upload config, weights and model card to the Hub repo ``repo_id`` (created if needed)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message)


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


_SCHEMA: dict[str, tuple[type, ...]] = {
    "num_classes": (int,),
    "encoder": (str,),
    "encoder_kwargs": (dict,),
    "in_chans": (int,),
    "mask_reduction": (int,),
    "width_multiplier": (int, float),
    "num_bottlenecks": (int,),
    "freeze_encoder": (bool,),
    "objective": (dict,),
}


_SMALL_OPTIONS = {"widths", "layers_per_block"}
_TIMM_OPTIONS = {"out_indices", "output_stride"}


def _validate_config(config: object) -> None:
    """Refuse a config that is not ours, or not well formed, before building anything."""
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"config: not a blackbox-saliency explainer config (format != {CONFIG_FORMAT!r})")
    if config.get("version") != CONFIG_VERSION:
        raise ValueError(f"config: unsupported version {config.get('version')!r}, expected {CONFIG_VERSION}")
    missing = [k for k in _SCHEMA if k not in config]
    if missing:
        raise ValueError(f"config: missing key(s) {missing}")
    for key, types in _SCHEMA.items():
        value = config[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise ValueError(f"config: {key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
    if config["num_classes"] < 2 or config["in_chans"] < 1 or config["mask_reduction"] < 1 or config["num_bottlenecks"] < 0:
        raise ValueError("config: num_classes, in_chans, mask_reduction or num_bottlenecks out of range")
    if config["encoder"].startswith("custom:"):
        raise ValueError("config: the explainer was built on a hand-made encoder module and cannot be rebuilt")
    if config["encoder"] != "small":
        import timm

        if not timm.is_model(config["encoder"]):
            raise ValueError(f"config: unknown encoder architecture {config['encoder']!r}")
    allowed = _SMALL_OPTIONS if config["encoder"] == "small" else _TIMM_OPTIONS
    unknown = sorted(set(config["encoder_kwargs"]) - allowed)
    if unknown:  # e.g. timm's checkpoint_path would load a file named by a stranger's config
        raise ValueError(f"config: encoder_kwargs {unknown} are not allowed; allowed: {sorted(allowed)}")
    if config.get("class_filter", "bottleneck") not in CLASS_FILTERS:
        raise ValueError(f"config: class_filter must be one of {CLASS_FILTERS}, got {config.get('class_filter')!r}")
    if not isinstance(config.get("classifier", {}), dict):
        raise ValueError("config: classifier must be an object")
    from .objective import SaliencyObjective

    SaliencyObjective.from_dict(config["objective"])


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
