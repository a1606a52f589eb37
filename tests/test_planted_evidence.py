"""The method works end to end: an explainer trained for under a minute on the CPU finds a
planted pattern that is the classifier's only evidence, and gives an empty mask for an absent
class. The untrained explainer fails the same check, so the check can fail."""

import pytest
import torch

from blackbox_saliency import Explainer, fit_explainer
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns, box_iou, mask_boxes

PATCH = 12
ENCODER = {"encoder": "small", "encoder_kwargs": {"widths": [16, 32, 64]}}


def _hit_rate(explainer, data):
    with torch.no_grad():
        masks = explainer(data.images, data.labels)
    return (box_iou(mask_boxes(masks), data.boxes) > 0.5).float().mean().item()


@pytest.fixture(scope="module")
def data():
    return PlantedPatterns(4000, patch=PATCH, seed=0), PlantedPatterns(200, patch=PATCH, seed=1)


@pytest.fixture(scope="module")
def trained(data):
    torch.set_num_threads(2)
    return fit_explainer(PatternClassifier(patch=PATCH), data[0], epochs=100, max_steps=1000, seed=0, progress=False, **ENCODER)


def test_masks_cover_the_planted_pattern(trained, data):
    assert _hit_rate(trained, data[1]) >= 0.75


def test_absent_class_gets_an_empty_mask(trained, data):
    test = data[1]
    with torch.no_grad():
        present = trained(test.images, test.labels).mean().item()
        absent = trained(test.images, (test.labels + 1) % 4).mean().item()
    assert absent < 0.05 and present > 2 * absent


def test_preserved_image_keeps_the_class_and_removed_image_loses_it(trained, data):
    test, classifier = data[1], PatternClassifier(patch=PATCH)

    def prob(images):
        return classifier(images).softmax(1).gather(1, test.labels.view(-1, 1)).mean().item()

    with torch.no_grad():
        masks = trained(test.images, test.labels)
        original, kept, removed = prob(test.images), prob(test.images * masks), prob(test.images * (1 - masks))
    # measured 2026-11-25: 0.998 -> kept 0.997, removed 0.33 (chance is 0.25)
    assert original > 0.99 and kept > 0.9 and removed < 0.5


def test_untrained_explainer_fails_the_same_check(data):
    torch.manual_seed(0)
    untrained = Explainer(num_classes=4, **ENCODER).eval()
    assert _hit_rate(untrained, data[1]) < 0.5
