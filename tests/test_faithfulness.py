"""Deletion and insertion AUC and the pointing game, against cases worked out by hand."""

import math

import pytest
import torch

from blackbox_saliency.evidence import blur_sigma_for, gaussian_blur
from blackbox_saliency.metrics import deletion_auc, insertion_auc, pointing_game

from conftest import tiny_cnn


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


class Diagonal(torch.nn.Module):
    """Class 0's logit is ``x[0, 0, 0] + x[0, 1, 1] - 1`` (channel 0), class 1's is 0: the
    probability of class 0 is ``sigmoid`` of that."""

    def forward(self, x):
        logit = x[:, 0, 0, 0] + x[:, 0, 1, 1] - 1
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


# A 2 x 2 image whose channel 0 is [[2, 0], [0, 2]]. With blur_sigma=1 the kernel is cut to
# radius 1 (the image is 2 px wide): weights (w, 1, w) / (1 + 2w), w = exp(-1/2), and reflect
# padding turns [a, b] into [b, a, b, a], so each 1-D pass gives a -> (1 - c) a + c b with
# c = 2w / (1 + 2w). In 2-D a pixel becomes (1 - c)^2 itself + c (1 - c) (its row and column
# neighbours) + c^2 the diagonal one: the blurred (0, 0) and (1, 1) are B = 2 (1 - c)^2 + 2 c^2.
W = math.exp(-0.5)
C = 2 * W / (1 + 2 * W)
B = 2 * (1 - C) ** 2 + 2 * C**2
IMAGE = torch.zeros(1, 3, 2, 2)
IMAGE[0, 0] = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
IMAGE[0, 1:] = torch.tensor([[0.3, -0.7], [1.1, 0.4]])  # other channels: ignored by the classifier
# saliency order (0, 0), (1, 0), (1, 1), (0, 1)
ORDER = torch.tensor([[[[0.9, 0.1], [0.5, 0.3]]]])


def test_the_hand_worked_blur_is_the_libraries():
    blurred = gaussian_blur(IMAGE, 1.0)
    assert blurred[0, 0, 0, 0].item() == pytest.approx(B, abs=1e-6)
    assert blurred[0, 0, 0, 1].item() == pytest.approx(2 * 2 * C * (1 - C), abs=1e-6)


def test_deletion_curve_four_steps_by_hand():
    auc, curve = deletion_auc(Diagonal(), IMAGE, ORDER, 0, steps=4, blur_sigma=1.0, return_curves=True)
    # remove (0, 0), then (1, 0) (unread), then (1, 1), then (0, 1) (unread)
    p = [sig(2 + 2 - 1), sig(B + 2 - 1), sig(B + 2 - 1), sig(B + B - 1), sig(B + B - 1)]
    assert curve[0].tolist() == pytest.approx(p, abs=1e-6)
    assert auc.item() == pytest.approx((p[0] / 2 + p[1] + p[2] + p[3] + p[4] / 2) / 4, abs=1e-6)


def test_deletion_and_insertion_two_steps_by_hand():
    # two pixels a step: (0, 0) and (1, 0) go first, then (1, 1) and (0, 1)
    p = [sig(3), sig(B + 1), sig(2 * B - 1)]
    auc = deletion_auc(Diagonal(), IMAGE, ORDER, [0], steps=2, blur_sigma=1.0)
    assert auc.item() == pytest.approx((p[0] / 2 + p[1] + p[2] / 2) / 2, abs=1e-6)
    # insertion starts from the blurred image and puts (0, 0) and (1, 0) back first
    q = [sig(2 * B - 1), sig(2 + B - 1), sig(3)]
    auc, curve = insertion_auc(Diagonal(), IMAGE, ORDER, torch.tensor([0]), steps=2, blur_sigma=1.0, return_curves=True)
    assert curve[0].tolist() == pytest.approx(q, abs=1e-6)
    assert auc.item() == pytest.approx((q[0] / 2 + q[1] + q[2] / 2) / 2, abs=1e-6)


def test_steps_that_do_not_divide_the_pixels_use_the_true_shares():
    # 3 steps on 4 pixels: floor(k * 4 / 3) = 0, 1, 2, 4 pixels, at x = 0, 1/4, 1/2, 1
    p = [sig(3), sig(B + 1), sig(B + 1), sig(2 * B - 1)]
    auc, curve = deletion_auc(Diagonal(), IMAGE, ORDER, 0, steps=3, blur_sigma=1.0, return_curves=True)
    assert curve[0].tolist() == pytest.approx(p, abs=1e-6)
    expected = 0.25 * (p[0] + p[1]) / 2 + 0.25 * (p[1] + p[2]) / 2 + 0.5 * (p[2] + p[3]) / 2
    assert auc.item() == pytest.approx(expected, abs=1e-6)


def test_ties_are_broken_in_raster_order():
    # all equal: (0, 0), (0, 1), (1, 0), (1, 1), so (1, 1) goes last
    flat = torch.full((1, 1, 2, 2), 0.5)
    _, curve = deletion_auc(Diagonal(), IMAGE, flat, 0, steps=4, blur_sigma=1.0, return_curves=True)
    assert curve[0].tolist() == pytest.approx([sig(3), sig(B + 1), sig(B + 1), sig(B + 1), sig(2 * B - 1)], abs=1e-6)
    # a tie between (0, 1) and (1, 1) after (0, 0): (0, 1) comes first in raster order
    tied = torch.tensor([[[[1.0, 0.5], [0.0, 0.5]]]])
    _, curve = deletion_auc(Diagonal(), IMAGE, tied, 0, steps=4, blur_sigma=1.0, return_curves=True)
    assert curve[0].tolist() == pytest.approx([sig(3), sig(B + 1), sig(B + 1), sig(2 * B - 1), sig(2 * B - 1)], abs=1e-6)
    # only the order counts: any map with the same ranking gives the same AUC
    a = deletion_auc(Diagonal(), IMAGE, ORDER, 0, steps=4, blur_sigma=1.0)
    b = deletion_auc(Diagonal(), IMAGE, 10 * ORDER - 3, 0, steps=4, blur_sigma=1.0)
    assert torch.equal(a, b)


def test_the_removed_state_is_the_papers_blur():
    torch.manual_seed(0)
    model = tiny_cnn(5).eval()
    images, masks = torch.randn(2, 3, 20, 24), torch.rand(2, 1, 20, 24)
    ids = torch.tensor([1, 3])
    with torch.no_grad():
        p = lambda x: model(x).softmax(1).gather(1, ids[:, None]).squeeze(1)  # noqa: E731
        p_image, p_blurred = p(images), p(gaussian_blur(images, blur_sigma_for(20, 24)))
    _, deletion = deletion_auc(model, images, masks, ids, steps=3, return_curves=True)
    _, insertion = insertion_auc(model, images, masks, ids, steps=3, return_curves=True)
    assert torch.allclose(deletion[:, 0], p_image, atol=1e-6) and torch.allclose(deletion[:, -1], p_blurred, atol=1e-6)
    assert torch.allclose(insertion[:, 0], p_blurred, atol=1e-6) and torch.allclose(insertion[:, -1], p_image, atol=1e-6)


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.largest = model, 0

    def forward(self, x):
        self.largest = max(self.largest, x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("metric", [deletion_auc, insertion_auc])
def test_batched_equals_per_sample_and_chunks_are_bounded(metric):
    torch.manual_seed(1)
    model = Counting(tiny_cnn(4).eval())
    images, masks = torch.randn(5, 3, 16, 16), torch.rand(5, 1, 16, 16)
    masks[2] = (masks[2] > 0.5).float()  # plenty of ties
    ids = torch.tensor([0, 1, 2, 3, 0])
    single = torch.cat([metric(model, images[i : i + 1], masks[i : i + 1], int(ids[i]), steps=6) for i in range(5)])
    for batch_size in (1, 4, 7, 100):
        model.largest = 0
        batched = metric(model, images, masks, ids, steps=6, batch_size=batch_size)
        assert batched.shape == (5,)
        assert torch.allclose(batched, single, atol=1e-6)
        assert model.largest == min(batch_size, 5 * 7)


def test_runs_the_classifier_in_eval_mode_and_leaves_it_as_it_was():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    images, masks = torch.randn(3, 3, 8, 8), torch.rand(3, 1, 8, 8)
    stats = model[1].running_mean.clone()
    trained = deletion_auc(model, images, masks, 0, steps=4, batch_size=5)
    assert model.training and torch.equal(model[1].running_mean, stats)
    assert torch.allclose(trained, deletion_auc(model.eval(), images, masks, 0, steps=4), atol=1e-6)


def test_a_faithful_map_beats_an_unfaithful_one():
    # class 0 reads the top-left quadrant: a map pointing there deletes fast and inserts fast
    reader = lambda x: torch.stack([4 * x[:, 0, :4, :4].mean((1, 2)), torch.zeros(len(x))], 1)  # noqa: E731
    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, :4, :4] = 2.0
    good = torch.zeros(1, 1, 8, 8)
    good[..., :4, :4] = 1
    kw = dict(steps=8, blur_sigma=1.5)
    assert deletion_auc(reader, images, good, 0, **kw) < deletion_auc(reader, images, 1 - good, 0, **kw)
    assert insertion_auc(reader, images, good, 0, **kw) > insertion_auc(reader, images, 1 - good, 0, **kw)


@pytest.mark.parametrize("metric", [deletion_auc, insertion_auc])
def test_bad_input_names_the_argument(metric):
    model, images, masks = tiny_cnn(3).eval(), torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    cases = [
        (dict(masks=torch.rand(1, 1, 8, 8)), ValueError, "masks"),
        (dict(masks=torch.rand(2, 1, 4, 4)), ValueError, "masks.*interpolate"),
        (dict(masks=torch.rand(2, 8, 8)), ValueError, "masks"),
        (dict(masks=torch.full((2, 1, 8, 8), float("nan"))), ValueError, "masks.*NaN"),
        (dict(images=torch.randn(3, 8, 8)), ValueError, "images"),
        (dict(class_ids=[0, 1, 2]), ValueError, "class_ids"),
        (dict(class_ids=torch.tensor([0, 3])), ValueError, "class_ids: class id 3"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(blur_sigma=-1.0), ValueError, "blur_sigma"),
        (dict(classifier=None), TypeError, "classifier"),
    ]
    for change, error, match in cases:
        kw = dict(classifier=model, images=images, masks=masks, class_ids=0) | change
        with pytest.raises(error, match=match):
            metric(**kw)


def test_pointing_game_tolerance_edges():
    box = [torch.tensor([[0, 0, 9, 9]])]
    m = torch.zeros(1, 1, 32, 32)
    m[0, 0, 5, 19] = 1  # the point (x=19, y=5): 10 px right of the box's last column
    assert pointing_game(m, box, tolerance=10) == 0.0  # strictly within, as TorchRay
    assert pointing_game(m, box, tolerance=10.5) == 1.0
    m = torch.zeros(1, 1, 32, 32)
    m[0, 0, 13, 12] = 1  # (x=12, y=13): 3 and 4 px from the corner (9, 9), a distance of 5
    assert pointing_game(m, box, tolerance=5) == 0.0
    assert pointing_game(m, box, tolerance=5.01) == 1.0
    assert pointing_game(m, box) == 1.0  # the default 15


def test_pointing_game_inside_and_on_the_border():
    box = [torch.tensor([[4, 6, 9, 12]])]
    for (x, y), hit in {(4, 6): True, (9, 12): True, (6, 8): True, (10, 12): False, (3, 6): False}.items():
        m = torch.zeros(1, 1, 16, 16)
        m[0, 0, y, x] = 1
        # tolerance 0 (and 1: distances below 1 px) count only points inside the inclusive box
        assert pointing_game(m, box, tolerance=0) == float(hit)
        assert pointing_game(m, box, tolerance=1) == float(hit)
        assert pointing_game(m, box, tolerance=1.01) == 1.0  # one pixel outside is within 1.01


def test_pointing_game_ties_take_the_first_maximum_in_raster_order():
    m = torch.zeros(1, 1, 32, 32)
    m[0, 0, 20, 1] = 1  # (x=1, y=20)
    m[0, 0, 2, 30] = 1  # (x=30, y=2): the earlier row, so the point
    assert pointing_game(m, [torch.tensor([[28, 0, 31, 4]])], tolerance=0) == 1.0
    assert pointing_game(m, [torch.tensor([[0, 18, 3, 22]])], tolerance=0) == 0.0
    flat = torch.full((1, 1, 32, 32), 0.3)  # a flat map points at its top-left pixel
    assert pointing_game(flat, [torch.tensor([[0, 0, 0, 0]])], tolerance=0) == 1.0
    assert pointing_game(flat, [torch.tensor([[1, 1, 31, 31]])], tolerance=1) == 0.0


def test_pointing_game_batches_boxes_and_hits():
    m = torch.zeros(3, 1, 20, 20)
    m[0, 0, 2, 2] = m[1, 0, 15, 15] = m[2, 0, 10, 10] = 1
    boxes = [torch.tensor([[12, 12, 19, 19], [0, 0, 3, 3]]),  # a hit on the second box
             torch.tensor([0, 0, 5, 5]),  # one box as a (4,) tensor: a miss
             torch.zeros(0, 4)]  # no boxes: a miss
    accuracy, hits = pointing_game(m, boxes, tolerance=2, return_hits=True)
    assert hits.dtype == torch.bool and hits.tolist() == [True, False, False]
    assert accuracy == pytest.approx(1 / 3)
    # the same as image by image
    assert [pointing_game(m[i : i + 1], [boxes[i]], tolerance=2) for i in range(3)] == [1.0, 0.0, 0.0]


def test_pointing_game_agrees_with_an_occupancy_map_reference():
    # TorchRay's form: the boxes' pixels as a boolean map, a hit when any is at d^2 < tolerance^2
    g = torch.Generator().manual_seed(3)
    n, h, w = 40, 24, 30
    masks = torch.rand(n, 1, h, w, generator=g)
    boxes = []
    for _ in range(n):
        x0, y0 = torch.randint(0, w, (1,), generator=g).item(), torch.randint(0, h, (1,), generator=g).item()
        x1 = x0 + torch.randint(0, 6, (1,), generator=g).item()
        y1 = y0 + torch.randint(0, 6, (1,), generator=g).item()
        boxes.append(torch.tensor([[x0, y0, min(x1, w - 1), min(y1, h - 1)]]))
    for tolerance in (1, 3, 7):
        _, hits = pointing_game(masks, boxes, tolerance=tolerance, return_hits=True)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        for i in range(n):
            py, px = divmod(int(masks[i, 0].argmax()), w)
            x0, y0, x1, y1 = boxes[i][0].tolist()
            occupied = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            near = (xs - px) ** 2 + (ys - py) ** 2 < tolerance**2
            assert bool(hits[i]) == bool((occupied & near).any())


def test_pointing_game_bad_input_names_the_argument():
    m = torch.rand(2, 1, 8, 8)
    box = torch.tensor([[0, 0, 3, 3]])
    with pytest.raises(ValueError, match="gt_boxes: got 1 entries for 2"):
        pointing_game(m, [box])
    with pytest.raises(ValueError, match="gt_boxes: entry 1"):
        pointing_game(m, [box, torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="gt_boxes: entry 0 has a box with x1 < x0"):
        pointing_game(m, [torch.tensor([[5, 0, 3, 3]]), box])
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(m, [box, box], tolerance=-1)
    with pytest.raises(ValueError, match="masks"):
        pointing_game(torch.rand(2, 8, 8), [box, box])
    with pytest.raises(ValueError, match="masks.*NaN"):
        pointing_game(torch.full((2, 1, 8, 8), float("nan")), [box, box])
