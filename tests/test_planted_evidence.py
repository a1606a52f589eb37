"""The method works end to end: an explainer trained for under a minute on the CPU finds a
planted pattern that is the classifier's only evidence, and gives an empty mask for an absent
class. The untrained explainer fails the same check, so the check can fail."""

import pytest
import torch

from blackbox_saliency import Explainer, fit_explainer, get_recipe
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns, paired_box_iou, inside_boxes, mask_boxes, train_pattern_cnn

PATCH = 12
ENCODER = {"encoder": "small", "encoder_kwargs": {"widths": [16, 32, 64]}}
# the "small" recipe with a smaller encoder, in float32 (quick on any CPU), batches of 32: 400
# embedding-stage steps, then 1,000 mask steps (about a minute and a half on 2 cores)
RECIPE = get_recipe("small").replace(**{
    "model.encoder_kwargs": ENCODER["encoder_kwargs"], "runtime.precision": "fp32", "schedule.batch_size": 32,
    "schedule.stages": [{"kind": "embedding", "share": 400 / 1400, "removed_peak_weight": 1.0},
                        {"kind": "masks", "share": 1000 / 1400, "filter": "presence_only"}]})


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
    return fit_explainer(PatternClassifier(patch=PATCH), data[0], RECIPE, steps=1400, seed=0, progress=False)


def test_masks_cover_the_planted_pattern(trained, data):
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
    assert original > 0.99 and kept > 0.9 and removed < 0.5


def test_untrained_explainer_fails_the_same_check(data):
    torch.manual_seed(0)
    untrained = Explainer(num_classes=4, **ENCODER).eval()
    assert _hit_rate(untrained, data[1]) < 0.5


# A second planted task with a learned classifier (a different pattern size, a noisy background
# and a trained CNN), where a one-stage training ignores the class: the recipe must keep an
# absent class's mask empty and the true class's on the pattern. The small recipe's quality test:
# slow (about four minutes for both seeds on 2 cores).
@pytest.fixture(scope="module")
def learned():
    torch.set_num_threads(2)
    train = PlantedPatterns(4000, size=40, patch=8, noise=0.15, seed=10)
    test = PlantedPatterns(300, size=40, patch=8, noise=0.15, seed=11)
    classifier = train_pattern_cnn(train, steps=400)
    explainer = fit_explainer(classifier, train, RECIPE, steps=1400, seed=0, progress=False)
    return explainer, test, classifier, train


def _check_learned(explainer, test):
    with torch.no_grad():
        masks = explainer(test.images, test.labels)
        absent = explainer(test.images, (test.labels + 1) % 4)
    inside = inside_boxes(test.boxes, *masks.shape[-2:])
    assert absent.mean() <= 0.05 and absent.mean() <= masks.mean() / 5
    assert masks[inside].mean() > 0.5 and masks[~inside].mean() < 0.1


@pytest.mark.slow
def test_learned_classifier_absent_class_gets_an_empty_mask_and_present_one_sits_on_the_pattern(learned):
    _check_learned(*learned[:2])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_the_small_recipe_passes_on_other_seeds(learned, seed):
    _, test, classifier, train = learned
    _check_learned(fit_explainer(classifier, train, RECIPE, steps=1400, seed=seed, progress=False), test)
