"""The saliency objective (the paper's eq. 4) and its terms.

``L(M) = tv_weight * TV(M) + area_weight * AV(M) + preserve_weight * preserve(X, M)
+ destroy_weight * destroy(X, M)``, where the paper has ``preserve = -log f_c(Phi(X, M))`` and
``destroy = f_c(Phi(X, 1 - M)) ** destroy_power``.

Normalisation: ``TV`` is the *mean* squared difference between neighbouring mask pixels and
``AV`` the *mean* of ``(M + area_eps) ** area_power`` over pixels, both on the mask at the
resolution the model (or the optimiser) produces it. With ``area_power=1, area_eps=0`` the
area term is the paper's plain average.

Defaults are not the paper's numbers read literally; they are what passed the planted-evidence
benchmark (``benchmarks/planted_objective.py``, table in ``docs/objective.md``):

- area: ``8 * mean((M + 5e-4) ** 0.3)`` (the authors' code). The paper's ``l2 = 1e-3`` on a
  mean leaves the all-ones mask nearly optimal, so masks say nothing.
- classifier terms: hinge losses on logit margins (the authors' code), weights 0.3 (preserve)
  and 1 (destroy). The paper's ``p ** 0.3`` on a softmax probability has almost no gradient
  when the classifier is confident (at a logit margin of 8 it is about 1e-3), and training
  collapses to empty masks. ``classifier_loss="probability"`` gives the paper's form.

:meth:`SaliencyObjective.paper` gives the paper's objective exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .evidence import alternative_image, remove_evidence

__all__ = ["SaliencyObjective", "total_variation", "area"]


def total_variation(masks: torch.Tensor) -> torch.Tensor:
    """Per-mask mean squared difference between vertical and horizontal neighbours, ``(N,)``."""
    dy = (masks[:, :, 1:, :] - masks[:, :, :-1, :]).pow(2).flatten(1)
    dx = (masks[:, :, :, 1:] - masks[:, :, :, :-1]).pow(2).flatten(1)
    count = dy.shape[1] + dx.shape[1]
    if count == 0:
        return masks.new_zeros(masks.shape[0])
    return (dy.sum(1) + dx.sum(1)) / count


def area(masks: torch.Tensor, power: float = 1.0, eps: float = 0.0) -> torch.Tensor:
    """Per-mask mean of ``(M + eps) ** power``, ``(N,)``; ``power=1, eps=0`` is the mean mask."""
    values = masks.flatten(1)
    if power != 1.0 or eps != 0.0:
        values = (values + eps).pow(power)
    return values.mean(1)


@dataclass(frozen=True)
class SaliencyObjective:
    """Weights of the paper's objective; call it to get per-image losses and their terms.

    Example:
        >>> objective = SaliencyObjective()
        >>> objective.paper().area_weight
        0.001
    """

    tv_weight: float = 10.0
    area_weight: float = 8.0
    area_power: float = 0.3
    area_eps: float = 5e-4
    preserve_weight: float = 0.3
    destroy_weight: float = 1.0
    destroy_power: float = 0.3
    blur_prob: float = 0.5
    classifier_loss: str = "hinge"
    preserve_margin: float = 1.0
    destroy_margin: float = 5.0

    def __post_init__(self) -> None:
        if self.classifier_loss not in ("probability", "hinge"):
            raise ValueError(f"classifier_loss: expected 'probability' or 'hinge', got {self.classifier_loss!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "classifier_loss" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                or not math.isfinite(value)):
                raise ValueError(f"objective.{f.name}: expected a finite number, got {value!r}")

    @classmethod
    def paper(cls) -> "SaliencyObjective":
        """The paper's numbers read literally: l1=10, l2=1e-3 on the plain mean, l3=5, l4=0.3."""
        return cls(tv_weight=10.0, area_weight=1e-3, area_power=1.0, area_eps=0.0, preserve_weight=1.0,
                   destroy_weight=5.0, classifier_loss="probability")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SaliencyObjective":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"objective: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: (float(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in values.items()})

    def regulariser_terms(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mask-only terms (``tv`` and ``area``, unweighted), per image."""
        return {"tv": total_variation(masks), "area": area(masks, self.area_power, self.area_eps)}

    def classifier_terms(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        masks: torch.Tensor,
        class_ids: torch.Tensor,
        alternatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The classifier's terms, per image, with ``masks`` at the images' resolution.

        ``classifier_loss="probability"`` (the paper): ``preserve = -log f_c(Phi(X, M))`` and
        ``destroy = f_c(Phi(X, 1-M)) ** destroy_power``. ``"hinge"`` (the authors' code): with
        ``m(z) = z_c - max_{k != c} z_k`` on the logits, ``preserve = relu(preserve_margin - m)``
        and ``destroy = relu(m + destroy_margin)``; unlike a softmax probability these keep
        their gradient when the classifier is very confident. One classifier call on both
        edited batches; each gets its own alternative image, drawn here unless
        ``alternatives`` gives the pair (for preserve, for destroy).
        """
        n = images.shape[0]
        if alternatives is None:
            alternatives = (alternative_image(images, self.blur_prob), alternative_image(images, self.blur_prob))
        alt, alt_inv = alternatives
        edited = torch.cat([remove_evidence(images, masks, alt), remove_evidence(images, 1 - masks, alt_inv)])
        logits = classifier(edited).float()
        ids = torch.cat([class_ids, class_ids]).view(-1, 1)
        if self.classifier_loss == "hinge":
            picked = logits.gather(1, ids).squeeze(1)
            rival = logits.scatter(1, ids, float("-inf")).amax(1)
            margin = picked - rival
            return {"preserve": F.relu(self.preserve_margin - margin[:n]), "destroy": F.relu(margin[n:] + self.destroy_margin)}
        picked = F.log_softmax(logits, dim=1).gather(1, ids).squeeze(1)
        # exp(power * log p) instead of p ** power: finite gradient when p underflows to 0.
        return {"preserve": -picked[:n], "destroy": torch.exp(self.destroy_power * picked[n:])}

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of whichever terms are present, per image."""
        weights = {
            "tv": self.tv_weight,
            "area": self.area_weight,
            "preserve": self.preserve_weight,
            "destroy": self.destroy_weight,
        }
        return sum(weights[name] * value for name, value in terms.items() if name in weights)

    def __call__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        masks: torch.Tensor,
        class_ids: torch.Tensor,
        low_res_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-image loss ``(N,)`` and its unweighted terms. ``low_res_masks`` (the masks as
        produced, before upsampling) carry the TV and area terms; default ``masks``."""
        terms = self.regulariser_terms(masks if low_res_masks is None else low_res_masks)
        terms.update(self.classifier_terms(classifier, images, masks, class_ids))
        return self.combine(terms), terms
