"""optimize_masks warns when the masks it returns say nothing: (nearly) empty or full (issue #13)."""

import warnings

import pytest
import torch

from blackbox_saliency import SaliencyObjective
from blackbox_saliency.optimize import optimize_masks

from conftest import ConstantLogits


class Brightness(torch.nn.Module):
    """Class 0's logit grows with the mean brightness of the image's first ``columns`` columns,
    class 1's falls: those pixels of a bright image are the evidence for class 0, a dark image
    has none."""

    def __init__(self, columns=16):
        super().__init__()
        self.columns = columns

    def forward(self, x):
        m = 10.0 * x[..., : self.columns].mean(dim=(1, 2, 3))
        return torch.stack([m, -m], 1)


def _degenerate(caught):
    return [w for w in caught if issubclass(w.category, UserWarning) and "optimize_masks" in str(w.message)]


def test_empty_masks_warn_once_with_the_count_and_what_to_try():
    # a classifier that ignores the image: only the area cost acts, and every mask empties
    with pytest.warns(UserWarning) as caught:
        masks = optimize_masks(ConstantLogits([0.0, 1.0]), torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 0]), steps=60)
    assert masks.flatten(1).mean(1).max() < 0.01
    found = _degenerate(caught)
    assert len(found) == 1 and found[0].filename == __file__  # it points at the caller
    message = str(found[0].message)
    assert "empty" in message and "3 of 3 images" in message
    assert "steps" in message and "lr" in message and "area_weight" in message


def test_full_masks_warn():
    objective = SaliencyObjective(area_weight=0.0, tv_weight=0.0)
    with pytest.warns(UserWarning) as caught:
        # without an area cost, every pixel of either image is evidence for its class
        images = torch.stack([torch.ones(3, 16, 16), -torch.ones(3, 16, 16)])
        masks = optimize_masks(Brightness(), images, torch.tensor([0, 1]), objective=objective, steps=60, lr=0.5)
    assert masks.flatten(1).mean(1).min() > 0.99
    message = str(_degenerate(caught)[0].message)
    assert "full" in message and "2 of 2 images" in message


def test_only_the_degenerate_images_are_counted():
    # the default objective; image 0's evidence is its bright left half, dark image 1 has none
    images = torch.stack([torch.ones(3, 16, 16), -torch.ones(3, 16, 16)])
    with pytest.warns(UserWarning) as caught:
        masks = optimize_masks(Brightness(columns=8), images, torch.tensor([0, 0]), steps=60, lr=0.5)
    area = masks.flatten(1).mean(1)
    assert 0.3 < area[0] < 0.7 and area[1] < 0.01
    message = str(_degenerate(caught)[0].message)
    assert "empty (mean mask < 0.01) for 1 of 2 images" in message and "full" not in message.split(";")[0]


def test_masks_with_something_in_them_do_not_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = optimize_masks(ConstantLogits([0.0, 1.0]), torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), steps=3)
    assert 0.01 < masks.mean() < 0.99
    assert not _degenerate(caught)
