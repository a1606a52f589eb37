"""The masking model: a U-Net over an encoder's feature pyramid with a class-selecting feature
filter at the coarsest scale (the paper's section 4, figure 4)."""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import encoder_pyramid, frozen_part

__all__ = ["FeatureFilter", "Upsampler", "MaskingModel", "MaskOutput"]


class MaskOutput(NamedTuple):
    """What the masking model returns for a batch."""

    mask: torch.Tensor
    """``(N, 1, H, W)`` in ``[0, 1]`` at the input resolution."""
    low_res_mask: torch.Tensor
    """``(N, 1, H/r, W/r)``: the mask as produced (``r`` is ``mask_reduction``), before upsampling."""
    presence_logit: torch.Tensor
    """``(N,)``: ``max_ij X_ij^T C_s``, high when class ``s`` is present (the embedding speed-up)."""
    class_logits: torch.Tensor | None = None
    """``(N, K)``: ``max_ij X_ij^T C_k`` for every class ``k``, when asked for (the presence
    loss that teaches the embedding which classes an image holds)."""


class FeatureFilter(nn.Module):
    """``Y_ij = X_ij * sigmoid(X_ij^T C_s)``: attenuates locations unrelated to class ``s``.

    ``C_s`` is learned per class (the paper's), or, with ``head_features=D``, a learned linear
    map of row ``s`` of the classifier's own linear head (``head_weight``, ``(K, D)``, a fixed
    buffer that :meth:`set_head` fills): one map shared by all classes, so a class the training
    data never showed still gets the embedding its head row implies.

    With ``presence_reference=r`` (a float) each image's scores are centred: ``X_ij^T C_s``
    less ``m - r``, where ``m`` is the image's mean over all classes of ``max_ij X_ij^T C_k``
    and ``r`` that mean on the training images (:meth:`raw_class_logits` measures it). An
    embedding trained on one kind of image scores too many classes present on another (sharp
    photographs after blurry 64 px training images: docs/objective.md); the ranking holds, the
    offset does not, and this takes the offset from the image itself.

    With ``presence_std_threshold=t`` each image's scores are standardised instead:
    ``(X_ij^T C_s - m) / d - t``, where ``m`` and ``d`` are the mean and standard deviation over
    all classes of the image's ``max_ij X_ij^T C_k``: a class is present when its score stands
    ``t`` deviations above the image's typical class. Neither offset nor scale then depends on
    the kind of image; it suits a filter started from the classifier's own head
    (``head_features``), whose ranking is good but whose scores are positive for most classes.
    """

    def __init__(self, num_classes: int, channels: int, head_features: int | None = None,
                 presence_reference: float | None = None, presence_std_threshold: float | None = None):
        super().__init__()
        for name, value in (("presence_reference", presence_reference),
                            ("presence_std_threshold", presence_std_threshold)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite number or None, got {value!r}")
        if presence_reference is not None and presence_std_threshold is not None:
            raise ValueError("presence_std_threshold: give it or presence_reference, not both (standardising "
                             "already centres each image's scores)")
        self.presence_reference = None if presence_reference is None else float(presence_reference)
        self.presence_std_threshold = None if presence_std_threshold is None else float(presence_std_threshold)
        self.head_features = head_features
        if head_features is not None and (isinstance(head_features, bool) or not isinstance(head_features, int)
                                          or head_features < 1):
            raise ValueError(f"class_embedding_features: expected the head's width, a positive int, got {head_features!r}")
        if head_features is None:
            self.embedding = nn.Embedding(num_classes, channels)
            nn.init.normal_(self.embedding.weight, std=1.0 / math.sqrt(channels))
        else:
            self.register_buffer("head_weight", torch.zeros(num_classes, head_features))
            self._head_set = False  # zero rows would give every class the same embedding
            self._register_load_state_dict_pre_hook(self._head_loaded)
            # rows are unit-normalised in use, so this init gives the learned embedding's scale
            self.projection = nn.Linear(head_features, channels, bias=False)
            nn.init.normal_(self.projection.weight, std=1.0 / math.sqrt(channels))

    def set_head(self, weight: torch.Tensor, head_input_map: torch.Tensor | None = None) -> None:
        """Copy the classifier head's weight ``(K, D)`` into ``head_weight``; with
        ``head_input_map`` ``M`` ``(D, C)`` (how the filtered feature map reaches the head, e.g.
        ``classifier_features(...).head_input_map``), also start the map from ``M^T``, so that
        ``X_ij^T C_k`` begins as class ``k``'s class activation map (up to the row's norm)."""
        if self.head_features is None:
            raise ValueError("set_head: this filter learns its class embeddings (head_features=None)")
        if tuple(weight.shape) != tuple(self.head_weight.shape):
            raise ValueError(f"weight: expected the head's weight of shape {tuple(self.head_weight.shape)}, "
                             f"got {tuple(weight.shape)}")
        if head_input_map is not None and tuple(head_input_map.shape) != tuple(self.projection.weight.shape[::-1]):
            raise ValueError(f"head_input_map: expected shape {tuple(self.projection.weight.shape[::-1])}, "
                             f"got {tuple(head_input_map.shape)}")
        with torch.no_grad():
            self.head_weight.copy_(weight.detach().to(self.head_weight))
            self._head_set = True
            if head_input_map is not None:
                self.projection.weight.copy_(head_input_map.detach().t().to(self.projection.weight))

    def _head_loaded(self, state_dict, prefix, *args) -> None:
        if prefix + "head_weight" in state_dict:
            self._head_set = True

    def embeddings(self, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``C_k``: ``(K, C)`` for every class, or ``(N, C)`` for ``class_ids``."""
        if self.head_features is None:
            return self.embedding.weight if class_ids is None else self.embedding(class_ids)
        if not self._head_set:
            raise RuntimeError("class_embedding: 'classifier_head' needs the classifier's head rows: call "
                               "feature_filter.set_head(weight) or load trained weights (fit_explainer does it)")
        rows = self.head_weight if class_ids is None else self.head_weight[class_ids]
        return self.projection(F.normalize(rows, dim=1))

    def raw_class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``max_ij X_ij^T C_k`` for every class ``k``, never centred: ``(N, K)``."""
        logits = torch.einsum("nchw,kc->nkhw", features, self.embeddings().to(features.dtype))
        return logits.flatten(2).amax(2)

    @property
    def normalises(self) -> bool:
        """Whether each image's class scores are centred or standardised (not the paper's filter)."""
        return self.presence_reference is not None or self.presence_std_threshold is not None

    def _normalisation(self, raw_class_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, scale)``, each ``(N,)``: an image's scores become ``(score - shift) / scale``."""
        raw = raw_class_logits.float()
        mean = raw.mean(1)
        if self.presence_std_threshold is None:  # centring
            return mean - self.presence_reference, torch.ones_like(mean)
        std = raw.std(1).clamp(min=1e-6)  # a constant image's scores: no class stands out
        return mean + self.presence_std_threshold * std, std

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``max_ij X_ij^T C_k`` for every class ``k`` (centred or standardised when set): ``(N, K)``."""
        logits = self.raw_class_logits(features)
        if not self.normalises:
            return logits
        shift, scale = self._normalisation(logits)
        return (logits - shift[:, None].to(logits.dtype)) / scale[:, None].to(logits.dtype)

    def forward(self, features: torch.Tensor, class_ids: torch.Tensor, gate_features: torch.Tensor | None = None,
                detach_gate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Filtered features, the attention ``sigmoid(X_ij^T C_s)`` ``(N, 1, h, w)`` and the
        per-image ``max_ij X_ij^T C_s`` (centred or standardised when set). ``X`` is
        ``gate_features`` when given (a separate gate encoder's map), else ``features``.
        ``detach_gate``: no gradient reaches ``X`` or ``C_s`` through the attention (the
        per-image score still passes it)."""
        gate = features if gate_features is None else gate_features
        class_embedding = self.embeddings(class_ids)  # (N, C)
        logits = torch.einsum("nchw,nc->nhw", gate, class_embedding.to(gate.dtype)).unsqueeze(1)
        if self.normalises:
            shift, scale = self._normalisation(self.raw_class_logits(gate))
            logits = (logits - shift[:, None, None, None].to(logits.dtype)) / scale[:, None, None, None].to(logits.dtype)
        attention = torch.sigmoid(logits.detach() if detach_gate else logits)
        return features * attention, attention, logits.flatten(1).amax(1)


class _Bottleneck(nn.Module):
    """ResNet bottleneck block with identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        mid = max(channels // 4, 4)
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class Upsampler(nn.Module):
    """Upsample by ``factor`` (3x3 conv then pixel shuffle), concatenate the encoder's map at that
    scale, mix with a 1x1 conv, then ``num_bottlenecks`` bottleneck blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, factor: int = 2, num_bottlenecks: int = 1):
        super().__init__()
        self.up = nn.Sequential(
            nn.Conv2d(in_channels, out_channels * factor * factor, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels * factor * factor),
            nn.ReLU(inplace=True),
            nn.PixelShuffle(factor),
        )
        self.mix = nn.Sequential(
            nn.Conv2d(out_channels + skip_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.bottlenecks = nn.Sequential(*[_Bottleneck(out_channels) for _ in range(num_bottlenecks)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.bottlenecks(self.mix(torch.cat([self.up(x), skip], dim=1)))


CLASS_FILTERS = ("bottleneck", "all")
CLASS_EMBEDDINGS = ("learned", "classifier_head")


class MaskingModel(nn.Module):
    """Encoder + feature filter + upsamplers + two-channel head, mask ``|C0| / (|C0| + |C1|)``.

    Decoder widths derive from the encoder: each upsampler has ``width_multiplier`` times the
    channels of the encoder map it joins (0.75 gives the paper's 768/384/192 on ResNet-50).

    ``class_filter``: where the class selects features. ``"bottleneck"`` is the paper's: only
    the coarsest map passes the feature filter, and the skip connections reach the decoder
    unfiltered, so it can draw a mask from them whatever class is asked for. ``"all"`` also
    multiplies every skip map by the filter's attention ``sigmoid(X_ij^T C_s)``, upsampled to
    that map's size: where the class is not seen, no feature reaches the decoder at any scale
    (measured in docs/objective.md: this is what makes masks empty for an absent class).

    ``class_embedding``: ``"learned"`` (the paper's: one trained vector per class) or
    ``"classifier_head"``: each class's vector is a trained linear map of the classifier's head
    row for it (``class_embedding_features`` wide; see :class:`FeatureFilter`), so classes the
    training data lacks are not left with a random embedding.

    ``presence_reference``: None (the paper's filter), or a float that centres each image's
    class scores on it (see :class:`FeatureFilter`; set it with
    :meth:`~blackbox_saliency.Explainer.centre_presence`).

    ``presence_std_threshold``: None (the paper's filter), or a float ``t``: standardise each
    image's class scores over the classes and call a class present ``t`` deviations above their
    mean (see :class:`FeatureFilter`).

    ``gate_encoder``: False (the paper's: one encoder), or True: the feature filter's gate and
    class scores read their own copy of the encoder (``self.gate_encoder``), and the decoder the
    other. Training can then fix the gate after the embedding stage while the decoder's encoder
    goes on learning from the mask losses. Only for a trainable encoder.

    Example:
        >>> from blackbox_saliency.encoders import SmallEncoder
        >>> model = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=10)
        >>> out = model(torch.zeros(2, 3, 32, 32), torch.tensor([1, 2]))
        >>> tuple(out.mask.shape), tuple(out.low_res_mask.shape)
        ((2, 1, 32, 32), (2, 1, 8, 8))
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        mask_reduction: int = 4,
        width_multiplier: float = 0.75,
        num_bottlenecks: int = 1,
        freeze_encoder: bool = False,
        class_filter: str = "all",
        class_embedding: str = "learned",
        class_embedding_features: int | None = None,
        presence_reference: float | None = None,
        presence_std_threshold: float | None = None,
        gate_encoder: bool = False,
    ):
        super().__init__()
        if not isinstance(gate_encoder, bool):
            raise TypeError(f"gate_encoder: expected True or False, got {gate_encoder!r}")
        if gate_encoder and freeze_encoder:
            raise ValueError("gate_encoder: a frozen encoder gives the gate and the decoder the same features; "
                             "a separate gate encoder needs a trainable one (freeze_encoder=False)")
        if class_filter not in CLASS_FILTERS:
            raise ValueError(f"class_filter: expected one of {CLASS_FILTERS}, got {class_filter!r}")
        if class_embedding not in CLASS_EMBEDDINGS:
            raise ValueError(f"class_embedding: expected one of {CLASS_EMBEDDINGS}, got {class_embedding!r}")
        if (class_embedding == "classifier_head") != (class_embedding_features is not None):
            raise ValueError("class_embedding_features: give the head's width with class_embedding='classifier_head' "
                             f"and only then (got {class_embedding_features!r} with {class_embedding!r})")
        self.class_embedding = class_embedding
        self.class_filter = class_filter
        if num_classes < 2:
            raise ValueError(f"num_classes: need at least 2 classes, got {num_classes}")
        channels, reductions = encoder_pyramid(encoder)
        if mask_reduction not in reductions:
            raise ValueError(
                f"mask_reduction: the encoder has feature maps at reductions {reductions}, none at {mask_reduction}"
            )
        if reductions[-1] <= mask_reduction:
            raise ValueError(f"encoder: its coarsest map (reduction {reductions[-1]}) must be coarser than the mask's")
        self.encoder = encoder
        self.gate_encoder = copy.deepcopy(encoder) if gate_encoder else None
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:  # the whole encoder, or only the trunk of a ViT pyramid (encoders.frozen_part)
            frozen_part(encoder).requires_grad_(False)
        self.num_classes = num_classes
        self.mask_reduction = mask_reduction
        self.stride = reductions[-1]
        self.feature_filter = FeatureFilter(num_classes, channels[-1], class_embedding_features, presence_reference,
                                            presence_std_threshold)
        # Skip connections: every map from just below the coarsest down to the mask's scale.
        self._skip_indices = [i for i in range(len(reductions) - 1) if reductions[i] >= mask_reduction][::-1]
        upsamplers, cin, prev = [], channels[-1], reductions[-1]
        for i in self._skip_indices:
            factor = prev // reductions[i]
            if factor * reductions[i] != prev or factor < 2:
                raise ValueError(f"encoder: reductions {reductions} do not step by whole factors")
            cout = max(8, int(round(width_multiplier * channels[i])))
            upsamplers.append(Upsampler(cin, channels[i], cout, factor, num_bottlenecks))
            cin, prev = cout, reductions[i]
        self.upsamplers = nn.ModuleList(upsamplers)
        self.head = nn.Conv2d(cin, 2, 1)

    def train(self, mode: bool = True) -> "MaskingModel":
        super().train(mode)
        if self.freeze_encoder:
            frozen_part(self.encoder).eval()  # a frozen encoder keeps its BatchNorm statistics
        return self

    def _features(self, images: torch.Tensor, encoder: nn.Module | None = None) -> list[torch.Tensor]:
        encoder = self.encoder if encoder is None else encoder
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.stride, (-width) % self.stride
        if pad_h or pad_w:  # any size works: pad to a multiple of the encoder's stride, crop after
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        whole = self.freeze_encoder and frozen_part(self.encoder) is self.encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not whole):
            return encoder(images)

    def gate_features(self, images: torch.Tensor) -> torch.Tensor:
        """The coarsest map the feature filter's gate and class scores read."""
        return self._features(images, self.gate_encoder)[-1]

    def presence(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` class logits ``max_ij X_ij^T C_k`` of the feature filter, without the
        decoder: what the embedding stage of training trains."""
        return self.feature_filter.class_logits(self.gate_features(images)).float()

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor, class_logits: bool = False,
                detach_gate: bool = False) -> MaskOutput:
        """Masks for ``class_ids``; ``class_logits=True`` also scores every class, and
        ``detach_gate=True`` keeps the mask losses from reaching the class filter (training)."""
        height, width = images.shape[-2:]
        features = self._features(images)
        gate = self.gate_features(images) if self.gate_encoder is not None else features[-1]
        x, attention, presence_logit = self.feature_filter(features[-1], class_ids, gate, detach_gate)
        scores = self.feature_filter.class_logits(gate).float() if class_logits else None
        for i, upsampler in zip(self._skip_indices, self.upsamplers):
            skip = features[i]
            if self.class_filter == "all":
                skip = skip * F.interpolate(attention, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = upsampler(x, skip)
        c0, c1 = self.head(x).float().abs().unbind(1)
        low_res = (c0 / (c0 + c1 + 1e-6)).unsqueeze(1)
        padded = (height + (-height) % self.stride, width + (-width) % self.stride)
        mask = F.interpolate(low_res, size=padded, mode="bilinear", align_corners=False)
        return MaskOutput(mask[..., :height, :width].clamp(0, 1), low_res, presence_logit.float(), scores)
