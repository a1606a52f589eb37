"""The training losses: the paper's objective on a batch with fake classes (section 4.1), the
presence loss that teaches the class filter which classes an image holds (the paper's
embedding speed-up), and the removed-peak loss that ties the filter to what the classifier uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._distributed import LOCAL, BatchShard
from ..evidence import alternative_image, remove_evidence
from ..masking_model import MaskOutput
from ..objective import SaliencyObjective

Classifier = Callable[[torch.Tensor], torch.Tensor]
# The removed peak's region is replaced by a blurred copy, never a random colour: a flat square
# with hard edges, which the classifier ignores, taught as "absent" shut whole classes' gates.
REMOVED_PEAK_BLUR_PROB = 1.0
REMOVED_PEAK_CELLS = 3


def presence_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every class's presence logit ``(N, K)``: the labelled class
    present, the others absent; the two sides weigh the same, so with 1000 classes the absent
    ones do not drown the present one.

    Example:
        >>> presence_loss(torch.tensor([[9.0, -9.0, -9.0]]), torch.tensor([0])).item() < 1e-3
        True
    """
    targets = F.one_hot(labels, class_logits.shape[1]).to(class_logits.dtype)
    per_class = F.binary_cross_entropy_with_logits(class_logits, targets, reduction="none")
    present = (per_class * targets).sum(1)
    absent = (per_class * (1 - targets)).sum(1) / (1 - targets).sum(1).clamp(min=1)
    return (0.5 * (present + absent)).mean()


@dataclass(frozen=True)
class FakeClasses:
    """Which images of a batch are explained for another class than theirs, and the classes:
    ``real`` (on the CPU, drawn without waiting for the device) and ``class_ids``."""

    real: torch.Tensor
    class_ids: torch.Tensor

    @classmethod
    def draw(cls, labels: torch.Tensor, num_classes: int, prob: float, shard: BatchShard = LOCAL) -> "FakeClasses":
        n = labels.shape[0]
        fake = shard.rand(n) < prob
        shift = shard.randint(1, num_classes, n)  # a fake class is any other class: (y + U{1..K-1}) mod K
        real = ~fake
        on_device = real.to(labels.device)
        return cls(real, torch.where(on_device, labels, (labels + shift.to(labels.device)) % num_classes))


def mask_objective(objective: SaliencyObjective, classifier: Classifier, images: torch.Tensor, out: MaskOutput,
                   fakes: FakeClasses, shard: BatchShard = LOCAL) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's mean over the batch and its terms for logging. Every image pays for its
    mask's area; smoothness and the classifier's terms apply to images given their real class
    only (a fake class should get an empty mask, nothing more)."""
    n = images.shape[0]
    # alternatives for the whole batch, fake rows included: the draws do not depend on how many are real
    alternatives = (alternative_image(images, objective.blur_prob, shard=shard),
                    alternative_image(images, objective.blur_prob, shard=shard))
    terms = objective.regulariser_terms(out.low_res_mask)
    real = fakes.real.to(images.device)
    terms["tv"] = terms["tv"] * real
    logged = {"area": out.mask.detach().mean()}
    rows = fakes.real.nonzero().squeeze(1).to(images.device)
    if len(rows):
        clf = objective.classifier_terms(classifier, images[rows], out.mask[rows], fakes.class_ids[rows],
                                         alternatives=(alternatives[0][rows], alternatives[1][rows]))
        for name, value in clf.items():  # one value per image, 0 for the fake rows
            terms[name] = terms["area"].new_zeros(n).index_add(0, rows, value.to(terms["area"].dtype))
            logged[name] = value.detach().mean()
    return objective.combine(terms).mean(), logged


@torch.no_grad()
def removed_peak_images(masking_model: nn.Module, images: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
                        shard: BatchShard = LOCAL) -> torch.Tensor:
    """``images`` with the cells of ``features`` (the coarsest map) around each image's highest
    score ``X_ij^T C_c`` for its label replaced by a blurred copy."""
    gate = masking_model.feature_filter(features, labels)[1].float()
    flat = gate.flatten(1)
    peak = torch.zeros_like(flat).scatter_(1, flat.argmax(1, keepdim=True), 1.0).view_as(gate)
    cells = REMOVED_PEAK_CELLS
    region = F.max_pool2d(peak, cells, stride=1, padding=cells // 2)
    # the map may cover a padded image (sizes not a multiple of the stride): crop, as the masks are
    region = F.interpolate(region, scale_factor=masking_model.stride, mode="nearest")[..., : images.shape[-2], : images.shape[-1]]
    alternative = alternative_image(images, REMOVED_PEAK_BLUR_PROB, shard=shard)
    return remove_evidence(images, 1 - region.to(images.dtype), alternative)


def removed_peak_loss(classifier: Classifier, masking_model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      features: torch.Tensor, shard: BatchShard = LOCAL) -> torch.Tensor:
    """Binary cross-entropy of the class filter's presence logit for ``labels`` on
    :func:`removed_peak_images`, against the classifier's probability for the class there:
    where the peak sat on the evidence, what is left must score the class absent."""
    with torch.no_grad():
        removed = removed_peak_images(masking_model, images, labels, features, shard)
        target = classifier(removed).float().softmax(1).gather(1, labels[:, None])[:, 0]
    logits = masking_model.feature_filter.class_logits(masking_model.gate_features(removed)).float()
    return F.binary_cross_entropy_with_logits(logits.gather(1, labels[:, None])[:, 0], target)
