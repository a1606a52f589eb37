"""Training stages: the class filter's embedding stage and the mask stage, each an object that
sets what trains as it starts and computes its loss on a batch.

What a stage freezes it freezes at its start (and the next stage's start or the run's end
releases it); nothing is switched per step and no attribute is set on the model: the mask
stage passes ``detach_gate`` to the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .._distributed import LOCAL, BatchShard
from ..explainer import Explainer
from ..masking_model import MaskOutput
from ..objective import SaliencyObjective
from ..recipes import EmbeddingStage, MaskStage, Sampling
from .losses import Classifier, FakeClasses, mask_objective, presence_loss, removed_peak_loss

Terms = dict[str, torch.Tensor]


class TrainingForward(nn.Module):
    """The explainer's training forward as one ``forward``, which DistributedDataParallel needs:
    masks for ``class_ids``, or (``class_ids=None``) every class's presence logit without the
    decoder, with the removed-peak loss when ``removed_peak`` is given."""

    def __init__(self, explainer: Explainer):
        super().__init__()
        self.explainer = explainer

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor | None, class_logits: bool = False,
                detach_gate: bool = False, removed_peak: Callable | None = None) -> MaskOutput | torch.Tensor | tuple:
        model = self.explainer.masking_model
        if class_ids is not None:
            return model(images, class_ids, class_logits=class_logits, detach_gate=detach_gate)
        if removed_peak is None:
            return model.presence(images)
        features = model.gate_features(images)  # both encoder passes in this one forward
        return model.feature_filter.class_logits(features).float(), removed_peak(model, images, features)


@dataclass
class Freezer:
    """Parameters a stage froze and modules it put in eval mode (with the mode each had), to
    release when the stage ends."""

    params: list[nn.Parameter] = field(default_factory=list)
    modes: list[tuple[nn.Module, bool]] = field(default_factory=list)

    def freeze(self, *parts: nn.Module) -> None:
        for part in parts:
            for p in part.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    p.grad = None  # Adam skips a parameter without a gradient
                    self.params.append(p)
            self.modes.append((part, part.training))
            part.eval()  # BatchNorm statistics stay as they are too

    def release(self) -> None:
        for p in self.params:
            p.requires_grad_(True)
        for part, training in reversed(self.modes):
            part.train(training)
        self.params.clear()
        self.modes.clear()


@dataclass
class StageContext:
    """What every stage of a run shares: the black box, the objective, the class count, the
    sampling settings and this process's share of each batch."""

    classifier: Classifier
    objective: SaliencyObjective
    num_classes: int
    sampling: Sampling
    shard: BatchShard = LOCAL

    def classes(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The class each image is explained for: its label or the classifier's prediction."""
        if self.sampling.class_source == "label":
            return labels
        with torch.no_grad():
            return self.classifier(images).argmax(1)


class Embedding:
    """The embedding stage: the class filter (and a trainable encoder) learn the presence loss,
    and, with ``removed_peak_weight``, its removed-peak twin. No decoder, no mask."""

    def __init__(self, spec: EmbeddingStage, context: StageContext):
        self.spec, self.context = spec, context
        self.name = "embedding"

    def start(self, explainer: Explainer, freezer: Freezer, at_beginning: bool) -> None:
        """Everything the stage reaches trains."""

    def loss(self, forward: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        ctx = self.context
        labels = ctx.classes(images, labels)
        if not self.spec.removed_peak_weight:
            loss = presence_loss(forward(images, None), labels)
            return loss, {"embed": loss.detach(), "loss": loss.detach()}
        removed = lambda model, x, features: removed_peak_loss(ctx.classifier, model, x, labels, features, ctx.shard)  # noqa: E731
        logits, peak = forward(images, None, removed_peak=removed)
        embed = presence_loss(logits, labels)
        loss = embed + self.spec.removed_peak_weight * peak
        return loss, {"embed": embed.detach(), "removed_peak": peak.detach(), "loss": loss.detach()}


class Masks:
    """The mask stage: the objective on a batch with fake classes, and, while the class filter
    learns, the presence loss."""

    def __init__(self, spec: MaskStage, context: StageContext, after_embedding: bool = False):
        self.spec, self.context, self.after_embedding = spec, context, after_embedding
        self.name = "masks"
        self.objective = (context.objective if spec.area_weight is None
                          else replace(context.objective, area_weight=spec.area_weight))

    def start(self, explainer: Explainer, freezer: Freezer, at_beginning: bool) -> None:
        """``"fixed"``: the class filter and the encoder it reads keep what they learnt;
        ``"presence_only"``: the encoder the decoder reads does (with a separate gate encoder,
        first started from the gate's copy the embedding stage trained)."""
        model = explainer.masking_model
        gate_encoder = model.gate_encoder
        if self.spec.filter == "fixed":
            freezer.freeze(model.feature_filter, model.encoder if gate_encoder is None else gate_encoder)
        elif self.spec.filter == "presence_only":
            if gate_encoder is not None and at_beginning and self.after_embedding:
                model.encoder.load_state_dict(gate_encoder.state_dict())
            freezer.freeze(model.encoder)

    @property
    def trains_filter(self) -> bool:
        return self.spec.filter != "fixed" and self.spec.presence_weight > 0

    def loss(self, forward: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        ctx = self.context
        labels = ctx.classes(images, labels)
        fakes = FakeClasses.draw(labels, ctx.num_classes, ctx.sampling.fake_label_prob, ctx.shard)
        out = forward(images, fakes.class_ids, class_logits=self.trains_filter,
                      detach_gate=self.spec.filter == "presence_only")
        loss, logged = mask_objective(self.objective, ctx.classifier, images, out, fakes, ctx.shard)
        if self.trains_filter:
            embed = presence_loss(out.class_logits, labels)
            loss = loss + self.spec.presence_weight * embed
            logged["embed"] = embed.detach()
        logged["loss"] = loss.detach()
        return loss, logged


def build_stages(specs: tuple[EmbeddingStage | MaskStage, ...], context: StageContext) -> list[Embedding | Masks]:
    """The run's stage objects, in order."""
    stages: list[Embedding | Masks] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, EmbeddingStage):
            stages.append(Embedding(spec, context))
        else:
            stages.append(Masks(spec, context, after_embedding=i > 0 and isinstance(specs[i - 1], EmbeddingStage)))
    return stages


def stage_ends(specs: tuple[EmbeddingStage | MaskStage, ...], total: int) -> list[int]:
    """The step at which each stage ends: the shares' running sums of ``total``, rounded.

    Example:
        >>> stage_ends((EmbeddingStage(8 / 11), MaskStage(3 / 11)), 7733)
        [5624, 7733]
    """
    ends, running = [], 0.0
    for spec in specs:
        running += spec.share
        ends.append(round(running * total))
    ends[-1] = total
    return ends
