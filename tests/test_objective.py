import dataclasses
import math

import pytest
import torch

from blackbox_saliency import SaliencyObjective, get_recipe
from blackbox_saliency.evidence import alternative_image, gaussian_blur, remove_evidence
from blackbox_saliency.objective import area, total_variation

from conftest import ConstantLogits


def test_total_variation_of_known_masks():
    assert total_variation(torch.ones(2, 1, 8, 8)).tolist() == [0.0, 0.0]
    checker = ((torch.arange(4).view(-1, 1) + torch.arange(4).view(1, -1)) % 2).float().view(1, 1, 4, 4)
    assert total_variation(checker).item() == pytest.approx(1.0)  # every neighbour pair differs by 1
    half = torch.zeros(1, 1, 4, 4)
    half[..., :2] = 1  # one vertical edge: 4 of the 24 pairs differ
    assert total_variation(half).item() == pytest.approx(4 / 24)


def test_area_plain_and_power():
    m = torch.zeros(1, 1, 4, 4)
    m[..., 0, :] = 1
    assert area(m).item() == pytest.approx(0.25)
    assert area(m, power=0.3, eps=5e-4).item() == pytest.approx(0.25 * (1 + 5e-4) ** 0.3 + 0.75 * (5e-4) ** 0.3)


def test_paper_objective_is_the_paper():
    p = SaliencyObjective.paper()
    assert (p.tv_weight, p.area_weight, p.destroy_weight, p.destroy_power) == (10.0, 1e-3, 5.0, 0.3)
    assert p.classifier_loss == "probability" and p.area_power == 1.0


def test_probability_terms_on_a_known_classifier():
    logits = torch.tensor([2.0, 0.0, -1.0])
    objective = SaliencyObjective(classifier_loss="probability")
    terms = objective.classifier_terms(ConstantLogits(logits), torch.randn(3, 3, 8, 8), torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    log_p = torch.log_softmax(logits, 0)
    assert torch.allclose(terms["preserve"], -log_p)
    assert torch.allclose(terms["destroy"], log_p.exp() ** 0.3)


def test_hinge_terms_on_a_known_classifier():
    objective = SaliencyObjective(classifier_loss="hinge", preserve_margin=1.0, destroy_margin=5.0)
    terms = objective.classifier_terms(ConstantLogits([2.0, 0.0, -1.0]), torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8), torch.tensor([0, 2]))
    # class 0 leads by 2: preserve needs a margin of 1 (met), destroy wants it 5 behind
    assert terms["preserve"].tolist() == [0.0, 4.0]
    assert terms["destroy"].tolist() == [7.0, 2.0]


def test_combine_weights_terms():
    objective = SaliencyObjective(tv_weight=2, area_weight=3, preserve_weight=5, destroy_weight=7)
    one = torch.ones(1)
    assert objective.combine({"tv": one, "area": one, "preserve": one, "destroy": one}).item() == 17


def test_bad_objective_settings():
    with pytest.raises(ValueError, match="classifier_loss"):
        SaliencyObjective(classifier_loss="nope")
    with pytest.raises(ValueError, match="unknown setting"):
        SaliencyObjective.from_dict({"lambda9": 1})


def test_the_objective_is_frozen():
    objective = SaliencyObjective()
    with pytest.raises(dataclasses.FrozenInstanceError):
        objective.area_weight = 1.0
    changed = dataclasses.replace(objective, area_weight=2.0)
    assert changed.area_weight == 2.0 and objective.area_weight == 8.0
    assert hash(objective) == hash(SaliencyObjective()) and objective != changed  # a value, usable as a key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "8", True, None, [8.0]])
def test_every_weight_must_be_a_finite_number_named_when_not(value):
    with pytest.raises(ValueError, match=r"objective\.area_weight: expected a finite number"):
        SaliencyObjective(area_weight=value)
    with pytest.raises(ValueError, match=r"objective\.destroy_margin: expected a finite number"):
        SaliencyObjective.from_dict({"destroy_margin": value})
    with pytest.raises(ValueError, match=r"objective\.tv_weight"):  # through a recipe too
        get_recipe("small").replace(objective={"tv_weight": value})


def test_from_dict_takes_ints_as_floats_and_round_trips():
    objective = SaliencyObjective.from_dict({"area_weight": 12, "classifier_loss": "probability"})
    assert objective.area_weight == 12.0 and type(objective.area_weight) is float
    assert SaliencyObjective.from_dict(objective.to_dict()) == objective
    assert SaliencyObjective.from_dict(SaliencyObjective.paper().to_dict()) == SaliencyObjective.paper()


def test_remove_evidence_keeps_and_replaces():
    x, a = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    assert torch.equal(remove_evidence(x, torch.ones(2, 1, 16, 16), a), x)
    assert torch.equal(remove_evidence(x, torch.zeros(2, 1, 16, 16), a), a)


def test_alternative_image_is_random_and_finite():
    x = torch.randn(64, 3, 32, 32)
    a1, a2 = alternative_image(x), alternative_image(x)
    assert a1.shape == x.shape and torch.isfinite(a1).all() and not torch.equal(a1, a2)


def test_blur_removes_high_frequencies():
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2).float() * 2 - 1
    blurred = gaussian_blur(checker.expand(1, 3, 32, 32), sigma=2.0)
    assert blurred.abs().max() < 0.05 * checker.abs().max()


@pytest.mark.parametrize("size, sigma", [((224, 224), 10.0), ((32, 48), 1.5), ((12, 12), 10.0)])
def test_blur_equals_torchvisions_two_dimensional_blur(size, sigma):
    from torchvision.transforms.v2 import functional as TF

    images = torch.randn(2, 3, *size)
    radius = min(math.ceil(3 * sigma), size[0] - 1, size[1] - 1)
    expected = TF.gaussian_blur(images, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
    torch.testing.assert_close(gaussian_blur(images, sigma), expected, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_the_mask():
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    mask = torch.full((2, 1, 8, 8), 0.5, requires_grad=True)
    loss, terms = SaliencyObjective()(classifier, torch.randn(2, 3, 8, 8), mask, torch.tensor([0, 1]))
    loss.sum().backward()
    assert set(terms) == {"tv", "area", "preserve", "destroy"}
    assert mask.grad is not None and mask.grad.abs().sum() > 0 and math.isfinite(loss.sum().item())
