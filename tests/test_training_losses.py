"""The training losses: presence, fake classes, the objective on a batch with fake classes, and
the removed-peak images and loss."""

import pytest
import torch
import torch.nn.functional as F

from blackbox_saliency.encoders import SmallEncoder
from blackbox_saliency.evidence import blur_sigma_for, gaussian_blur
from blackbox_saliency.masking_model import MaskingModel, MaskOutput
from blackbox_saliency.objective import SaliencyObjective, area
from blackbox_saliency.training.losses import (REMOVED_PEAK_CELLS, FakeClasses, mask_objective, presence_loss,
                                               removed_peak_images, removed_peak_loss)


def test_presence_loss_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    # present: softplus(-2); absent: mean of softplus(-1) and softplus(0); halves of each
    sp = lambda v: F.softplus(torch.tensor(v))  # noqa: E731
    expected = 0.5 * (sp(-2.0) + 0.5 * (sp(-1.0) + sp(0.0)))
    assert torch.allclose(presence_loss(logits, torch.tensor([0])), expected)
    # a batch is the mean of its rows; row 2 labelled 2: present softplus(-0), absent softplus(2), softplus(-1)
    two = torch.tensor([[2.0, -1.0, 0.0], [2.0, -1.0, 0.0]])
    second = 0.5 * (sp(0.0) + 0.5 * (sp(2.0) + sp(-1.0)))
    assert torch.allclose(presence_loss(two, torch.tensor([0, 2])), (expected + second) / 2)


def test_presence_loss_weighs_the_present_class_as_much_as_all_absent_ones():
    # with 1000 classes and every logit 0: log 2 on each side, not 1/1000 of it on the present one
    assert torch.allclose(presence_loss(torch.zeros(3, 1000), torch.tensor([0, 5, 999])), torch.tensor(2.0).log())
    confident = torch.full((1, 1000), -20.0)
    confident[0, 7] = 20.0
    assert presence_loss(confident, torch.tensor([7])).item() < 1e-6
    assert presence_loss(confident, torch.tensor([8])).item() > 10


def test_fake_classes_draws():
    labels = torch.arange(200) % 5
    none = FakeClasses.draw(labels, 5, 0.0)
    assert none.real.all() and torch.equal(none.class_ids, labels)
    torch.manual_seed(3)
    drawn = FakeClasses.draw(labels, 5, 0.5)
    fake = ~drawn.real
    assert drawn.real.device.type == "cpu" and drawn.real.dtype == torch.bool
    assert 60 < int(fake.sum()) < 140
    assert torch.equal(drawn.class_ids[drawn.real], labels[drawn.real])
    # a fake class is any other class, never the image's own, and each of the others turns up
    assert (drawn.class_ids[fake] != labels[fake]).all()
    assert drawn.class_ids.min() >= 0 and drawn.class_ids.max() < 5
    assert set(((drawn.class_ids[fake] - labels[fake]) % 5).tolist()) == {1, 2, 3, 4}
    torch.manual_seed(3)
    again = FakeClasses.draw(labels, 5, 0.5)
    assert torch.equal(again.real, drawn.real) and torch.equal(again.class_ids, drawn.class_ids)


def _batch():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 8, 8)
    low_res = torch.rand(3, 1, 4, 4, requires_grad=True)
    mask = F.interpolate(low_res, size=(8, 8), mode="bilinear", align_corners=False)
    out = MaskOutput(mask, low_res, torch.zeros(3))
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    return images, out, classifier


def test_mask_objective_fake_rows_pay_only_for_their_area():
    # blur_prob 1: every alternative is the blurred image, the same whichever rows are drawn
    objective = SaliencyObjective(blur_prob=1.0)
    images, out, classifier = _batch()
    fakes = FakeClasses(real=torch.tensor([True, False, True]), class_ids=torch.tensor([1, 2, 3]))
    loss, logged = mask_objective(objective, classifier, images, out, fakes)
    real = [0, 2]
    per_image, _ = objective(classifier, images[real], out.mask[real], fakes.class_ids[real], out.low_res_mask[real])
    fake_row = objective.area_weight * area(out.low_res_mask[1:2], objective.area_power, objective.area_eps)
    assert torch.allclose(loss, (per_image.sum() + fake_row.sum()) / 3)
    assert set(logged) == {"area", "preserve", "destroy"}
    assert torch.allclose(logged["area"], out.mask.mean())
    # the fake row's gradient is its area's alone: no smoothness, no classifier
    loss.backward()
    alone = torch.autograd.grad(fake_row.sum() / 3, out.low_res_mask)[0]
    assert torch.allclose(out.low_res_mask.grad[1], alone[1])
    assert not torch.allclose(out.low_res_mask.grad[0], alone[0])


def test_mask_objective_with_every_row_fake_is_the_area_term():
    objective = SaliencyObjective()
    images, out, classifier = _batch()
    calls = []
    counted = lambda x: calls.append(len(x)) or classifier(x)  # noqa: E731
    fakes = FakeClasses(real=torch.zeros(3, dtype=torch.bool), class_ids=torch.tensor([0, 1, 2]))
    loss, logged = mask_objective(objective, counted, images, out, fakes)
    expected = objective.area_weight * area(out.low_res_mask, objective.area_power, objective.area_eps).mean()
    assert torch.allclose(loss, expected) and set(logged) == {"area"} and calls == []


def _peaked_model_and_features():
    """A masking model (stride 8) whose class 0 scores channel 0 alone, and a 4 x 4 map whose
    only non-zero is channel 0 at cell (1, 2): class 0's peak."""
    torch.manual_seed(0)
    model = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=2).eval()
    with torch.no_grad():
        model.feature_filter.embedding.weight.zero_()
        model.feature_filter.embedding.weight[0, 0] = 1.0
    features = torch.zeros(1, 32, 4, 4)
    features[0, 0, 1, 2] = 5.0
    return model, features


@pytest.mark.parametrize("cell, rows, cols", [((1, 2), (0, 24), (8, 30)), ((0, 0), (0, 16), (0, 16)),
                                              ((3, 3), (16, 30), (16, 30))])
def test_removed_peak_images_replace_the_cells_around_the_peak_by_a_blurred_copy(cell, rows, cols):
    assert REMOVED_PEAK_CELLS == 3
    model, _ = _peaked_model_and_features()
    features = torch.zeros(1, 32, 4, 4)
    features[0, 0, cell[0], cell[1]] = 5.0
    images = torch.rand(1, 3, 30, 30)  # padded to 32 for the encoder: the region is cropped back
    removed = removed_peak_images(model, images, torch.tensor([0]), features)
    expected = torch.zeros(30, 30, dtype=torch.bool)
    expected[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert torch.equal((removed != images).any(1)[0], expected)
    blurred = gaussian_blur(images, blur_sigma_for(30, 30))
    assert torch.allclose(removed[..., expected], blurred[..., expected], atol=1e-6)


def test_removed_peak_loss_targets_what_the_classifier_sees_once_the_peak_is_gone():
    model, features = _peaked_model_and_features()
    # what is left scores class 0 at 0.5 (a random encoder's features are near 0, and a logit of 0
    # costs log 2 whatever the target)
    model._features = lambda x, encoder=None: [torch.full((len(x), 32, 4, 4), 0.5)]
    images = torch.zeros(1, 3, 32, 32)
    images[..., 8:16, 16:24] = 1.0  # the evidence, under class 0's peak

    def classifier(x):  # class 0 in proportion to the evidence's brightness
        return torch.stack([20 * x[:, :, 8:16, 16:24].mean((1, 2, 3)) - 18, torch.zeros(len(x))], 1)

    labels = torch.tensor([0])
    torch.manual_seed(1)
    loss = removed_peak_loss(classifier, model, images, labels, features)
    torch.manual_seed(1)
    removed = removed_peak_images(model, images, labels, features)
    seen = torch.softmax(classifier(removed), 1)[:, 0]
    assert seen.item() < 0.5 < torch.softmax(classifier(images), 1)[0, 0].item()  # removing the peak removed the class
    logit = model.presence(removed)[:, 0]
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logit, seen))
    # the target is the classifier's probability, not a hard "absent" or "present"
    assert torch.allclose(logit, torch.tensor([0.5])) and 0.01 < seen.item()
    for hard in (0.0, 1.0):
        assert not torch.allclose(loss, F.binary_cross_entropy_with_logits(logit, torch.full((1,), hard)))
