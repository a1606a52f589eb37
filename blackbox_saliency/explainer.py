"""``Explainer``: a trained masking model with the plain-JSON config that rebuilds it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._validation import ClassIds, check_class_ids, check_images
from .encoders import build_encoder
from .masking_model import MaskingModel, MaskOutput

__all__ = ["Explainer", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_FORMAT = "blackbox-saliency-explainer"
CONFIG_VERSION = 1


class Explainer(nn.Module):
    """Produces a saliency mask for an image and a class in one forward pass.

    An explainer belongs to the classifier it was trained against: masks say what *that*
    classifier needs. Build one with :func:`blackbox_saliency.fit_explainer`, or load one with
    :meth:`from_pretrained`.

    Args:
        num_classes: classes of the classifier it explains.
        encoder: ``"small"`` (the paper's CIFAR variant, random init), a timm model name, or an
            ``nn.Module`` feature pyramid (timm ``features_only=True`` or similar).
        pretrained_encoder: load timm's weights for a named encoder.
        encoder_kwargs: passed to the encoder's constructor (e.g. ``{"widths": [32, 64, 128]}``).
        num_bottlenecks: bottleneck blocks per upsampler; default 1 for ``"small"``, 3 otherwise.
        freeze_encoder: keep the encoder fixed in training; default: when it is pretrained or
            handed in as a module.
        classifier_info: plain facts about the classifier (name, input size, normalisation,
            class names), kept in the config.

    Example:
        >>> explainer = Explainer(num_classes=10, encoder="small", encoder_kwargs={"widths": [8, 16, 32]})
        >>> explainer.eval()(torch.randn(2, 3, 32, 32), [3, 5]).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str | nn.Module = "resnet50",
        pretrained_encoder: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
        in_chans: int = 3,
        mask_reduction: int = 4,
        width_multiplier: float = 0.75,
        num_bottlenecks: int | None = None,
        freeze_encoder: bool | None = None,
        objective: dict[str, float] | None = None,
        classifier_info: dict[str, Any] | None = None,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
        encoder_kwargs = dict(encoder_kwargs or {})
        if encoder == "small":
            pretrained_encoder = False  # the CIFAR variant is always trained from random init
        encoder_name = encoder if isinstance(encoder, str) else f"custom:{type(encoder).__name__}"
        module = build_encoder(encoder, pretrained=pretrained_encoder, in_chans=in_chans, **encoder_kwargs)
        if num_bottlenecks is None:
            num_bottlenecks = 1 if encoder == "small" else 3
        if freeze_encoder is None:
            freeze_encoder = bool(pretrained_encoder) or isinstance(encoder, nn.Module)
        self.masking_model = MaskingModel(
            module, num_classes, mask_reduction, width_multiplier, num_bottlenecks, freeze_encoder
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

    def forward(self, images: torch.Tensor, class_ids: ClassIds) -> torch.Tensor:
        """Masks ``(N, 1, H, W)`` in ``[0, 1]`` for ``images`` (as the classifier takes them) and
        ``class_ids`` (an int, a list or a ``(N,)`` tensor); 1 keeps evidence, 0 removes it.
        Runs on the explainer's device and returns on the images' device."""
        images = check_images(images, channels=self.config["in_chans"], min_size=self.config["mask_reduction"])
        ids = check_class_ids(class_ids, images.shape[0], self.num_classes)
        param = next(self.parameters())
        out = self.masking_model(images.to(param.device, param.dtype), ids.to(param.device))
        return out.mask.to(images.device)

    # ---- local files (the Hub builds on these) -------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

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
        return folder

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Explainer":
        """Build an (untrained) explainer from a config dict as written by :meth:`save_pretrained`."""
        if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
            raise ValueError(f"config: not a blackbox-saliency explainer config (format != {CONFIG_FORMAT!r})")
        if config.get("version") != CONFIG_VERSION:
            raise ValueError(f"config: unsupported version {config.get('version')!r}, expected {CONFIG_VERSION}")
        keys = ("num_classes", "encoder", "encoder_kwargs", "in_chans", "mask_reduction", "width_multiplier",
                "num_bottlenecks", "freeze_encoder", "objective")
        missing = [k for k in keys if k not in config]
        if missing:
            raise ValueError(f"config: missing key(s) {missing}")
        if str(config["encoder"]).startswith("custom:"):
            raise ValueError("config: the explainer was built on a hand-made encoder module and cannot be rebuilt")
        kwargs = {k: config[k] for k in keys}
        return cls(**kwargs, pretrained_encoder=False, classifier_info=config.get("classifier"))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Explainer":
        """Load an explainer saved with :meth:`save_pretrained` (safetensors only, strict)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"folder: {folder} has no {CONFIG_NAME}; is it an explainer folder?")
        if not weights_path.is_file():
            raise FileNotFoundError(f"folder: {folder} has no {WEIGHTS_NAME} (only safetensors weights are loaded)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"folder: {config_path} is not valid JSON ({err})") from err
        explainer = cls.from_config(config)
        state = load_file(str(weights_path), device=str(map_location))
        try:
            explainer.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"folder: weights in {weights_path} do not match its config: {err}") from err
        return explainer.eval()


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
