import math

import pytest
import torch

from blackbox_saliency.metrics import box_area, box_iou, localisation_error, saliency_metric, tightest_box

from conftest import ConstantLogits


def test_tightest_box_and_empty_mask():
    m = torch.zeros(2, 1, 10, 12)
    m[0, 0, 3:6, 2:9] = 0.9
    assert tightest_box(m).tolist() == [[2, 3, 8, 5], [0, 0, 11, 9]]
    with pytest.raises(ValueError, match="masks"):
        tightest_box(torch.zeros(10, 12))


def test_box_iou_known_values():
    a = torch.tensor([[0, 0, 9, 9]])
    assert box_iou(a, a).item() == 1.0
    assert box_iou(a, torch.tensor([[10, 10, 19, 19]])).item() == 0.0
    assert box_iou(a, torch.tensor([[0, 0, 9, 4]])).item() == pytest.approx(0.5)


def test_localisation_error_perfect_and_disjoint():
    m = torch.zeros(2, 1, 20, 20)
    m[:, :, 5:10, 5:10] = 1
    assert localisation_error(m, [torch.tensor([[5, 5, 9, 9]]), torch.tensor([[0, 0, 1, 1], [5, 5, 9, 9]])]) == 0.0
    error, hits = localisation_error(m, [torch.tensor([[12, 12, 19, 19]])] * 2, return_hits=True)
    assert error == 1.0 and hits.tolist() == [False, False]


def test_saliency_metric_full_box_is_minus_log_p():
    logits = torch.tensor([1.0, 0.0, -1.0])
    p = torch.softmax(logits, 0)
    full = torch.ones(3, 1, 16, 16)
    s = saliency_metric(ConstantLogits(logits), torch.randn(3, 3, 16, 16), full, torch.tensor([0, 1, 2]))
    assert torch.allclose(s, -torch.log(p), atol=1e-6)


def test_saliency_metric_area_floor_and_boxes():
    logits = torch.tensor([2.0, 0.0])
    boxes = torch.tensor([[0, 0, 7, 7], [0, 0, 0, 0]])  # a quarter of 16x16, and one pixel
    s = saliency_metric(ConstantLogits(logits), torch.randn(2, 3, 16, 16), None, torch.tensor([0, 0]), boxes=boxes)
    log_p = math.log(torch.softmax(logits, 0)[0].item())
    assert s.tolist() == pytest.approx([math.log(0.25) - log_p, math.log(0.05) - log_p], abs=1e-6)


def test_saliency_metric_crops_and_resizes():
    # the crop of a box is resized to the full size: a classifier that reads the mean of the
    # top-left quadrant sees only the box's content
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:, 8:] = 1.0
    reader = lambda x: torch.stack([x.mean(dim=(1, 2, 3)) * 10, torch.zeros(x.shape[0])], dim=1)  # noqa: E731
    inside = saliency_metric(reader, image, None, torch.tensor([0]), boxes=torch.tensor([[8, 8, 15, 15]]))
    outside = saliency_metric(reader, image, None, torch.tensor([0]), boxes=torch.tensor([[0, 0, 7, 7]]))
    assert inside.item() < outside.item()


def test_saliency_metric_of_the_full_box_is_minus_log_p_of_the_plain_image_on_a_real_cnn():
    # a classifier that reacts to every pixel: any blur by the crop would change its answer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 5)).eval()
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    full = torch.tensor([[0, 0, 15, 15]]).repeat(4, 1)
    with torch.no_grad():
        expected = -torch.log_softmax(model(images), 1).gather(1, labels[:, None]).squeeze(1)
    s = saliency_metric(model, images, None, labels, boxes=full)
    assert torch.allclose(s, expected, atol=1e-5)


def test_box_iou_inclusive_pixels_and_paired_form():
    from blackbox_saliency.testing import paired_box_iou

    a = torch.tensor([[0, 0, 0, 0], [0, 0, 3, 3]])  # one pixel; 4 x 4 pixels
    b = torch.tensor([[0, 0, 1, 0], [2, 2, 5, 5]])  # two pixels; 4 x 4 overlapping a's 2 x 2
    assert box_area(a).tolist() == [1.0, 16.0]
    assert torch.allclose(box_iou(a, b), torch.tensor([[0.5, 0.0], [2 / 16, 4 / 28]]))
    assert paired_box_iou(a, b).tolist() == pytest.approx([0.5, 4 / 28])


def test_testing_box_iou_old_name_warns():
    import blackbox_saliency.testing as testing

    with pytest.warns(FutureWarning, match="paired_box_iou"):
        assert testing.box_iou is testing.paired_box_iou
