"""The method works end to end: an explainer trained for under a minute on the CPU finds a
planted pattern that is the classifier's only evidence, and gives an empty mask for an absent
class. The untrained explainer fails the same check, so the check can fail."""

import pytest
import torch

from blackbox_saliency import Explainer, fit_explainer
from blackbox_saliency._precision import describe_cpu
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns, paired_box_iou, inside_boxes, mask_boxes, train_pattern_cnn

PATCH = 12
ENCODER = {"encoder": "small", "encoder_kwargs": {"widths": [16, 32, 64]}}


def _hit_rate(explainer, data):
    with torch.no_grad():
        masks = explainer(data.images, data.labels)
    return (paired_box_iou(mask_boxes(masks), data.boxes) > 0.5).float().mean().item()


@pytest.fixture(scope="module")
def data():
    return PlantedPatterns(4000, patch=PATCH, seed=0), PlantedPatterns(200, patch=PATCH, seed=1)


@pytest.fixture(scope="module")
def trained(data):
    torch.set_num_threads(2)
    # the class_selectivity benchmark's set-up: 400 embedding-stage steps, then 1,000 mask steps
    return fit_explainer(PatternClassifier(patch=PATCH), data[0], epochs=100, max_steps=1400, embedding_steps=400,
                         seed=0, progress=False, **ENCODER)


def test_masks_cover_the_planted_pattern(trained, data):
    # measured 0.99 with the defaults on this seed (2026-12-06); 0.53-0.70 on seeds 1-4, whose masks
    # spill a pixel or two past the pattern (docs/fit.md, "Defaults for the small encoder")
    assert _hit_rate(trained, data[1]) >= 0.65


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
    # measured 2026-12-06: 0.998 -> kept 0.998, removed 0.28 (chance is 0.25)
    assert original > 0.99 and kept > 0.9 and removed < 0.5


def test_untrained_explainer_fails_the_same_check(data):
    torch.manual_seed(0)
    untrained = Explainer(num_classes=4, **ENCODER).eval()
    assert _hit_rate(untrained, data[1]) < 0.5


# A second planted task with a learned classifier (a different pattern size, a noisy background
# and a trained CNN): with the paper's one-stage training the masks ignored the class here
# (absent 0.064, true 0.065; docs/objective.md), and with the defaults before 2026-12-06 on 3 seeds
# of 5 (docs/fit.md). The defaults must keep absent masks empty.
@pytest.fixture(scope="module")
def learned():
    torch.set_num_threads(2)
    train = PlantedPatterns(4000, size=40, patch=8, noise=0.15, seed=10)
    test = PlantedPatterns(300, size=40, patch=8, noise=0.15, seed=11)
    classifier = train_pattern_cnn(train, steps=400)
    # bf16 as measured (benchmarks/planted_test_settings.py): under precision="auto" the parts'
    # timing may pick float32 for some, and with the earlier defaults that changed this task's
    # result (benchmarks/planted_precision.py, docs/fit.md)
    explainer = fit_explainer(classifier, train, epochs=100, max_steps=1400, embedding_steps=400, seed=0,
                              progress=False, precision="bf16", **ENCODER)
    return explainer, test, classifier, train


def _check_learned(explainer, test):
    with torch.no_grad():
        masks = explainer(test.images, test.labels)
        absent = explainer(test.images, (test.labels + 1) % 4)
    inside = inside_boxes(test.boxes, *masks.shape[-2:])
    assert absent.mean() <= 0.05 and absent.mean() <= masks.mean() / 5
    assert masks[inside].mean() > 0.5 and masks[~inside].mean() < 0.1


def test_learned_classifier_absent_class_gets_an_empty_mask_and_present_one_sits_on_the_pattern(learned):
    # measured 2026-12-06 (bf16 autocast): absent 0.001, true 0.048, inside 0.65, outside 0.022
    _check_learned(*learned[:2])


# Measured with bf16 autocast, which only AMX runs at speed: emulated (e.g. an AMD EPYC) this
# test would add about half an hour to the suite.
@pytest.mark.skipif("AMX-BF16" not in describe_cpu(), reason="bf16 training without AMX is emulated: ~30 min")
def test_the_defaults_pass_on_a_seed_where_the_earlier_ones_did_not(learned):
    # seed 1: with the defaults before 2026-12-06 the masks spread off the pattern (outside 0.34);
    # with the small encoder's defaults since, measured 2026-12-06: absent 0.003, true 0.091,
    # inside 0.84, outside 0.059 (benchmarks/planted_test_settings.py, docs/fit.md)
    _, test, classifier, train = learned
    explainer = fit_explainer(classifier, train, epochs=100, max_steps=1400, embedding_steps=400, seed=1,
                              progress=False, precision="bf16", **ENCODER)
    _check_learned(explainer, test)
