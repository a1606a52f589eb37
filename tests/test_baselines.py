import importlib.util

import pytest
import torch

from blackbox_saliency.baselines import BASELINES, centre_box, gradient_saliency, map_to_mask, max_box
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

from conftest import tiny_cnn


def test_centre_box_covers_half_the_image():
    masks = centre_box(None, torch.zeros(2, 3, 100, 60))
    assert masks.shape == (2, 1, 100, 60)
    assert masks.mean().item() == pytest.approx(0.5, abs=0.02)
    assert masks[0, 0, 50, 30] == 1 and masks[0, 0, 0, 0] == 0


def test_max_box_is_everything():
    assert max_box(None, torch.zeros(1, 3, 8, 8)).eq(1).all()


def test_map_to_mask_scales_to_unit_peak():
    m = map_to_mask(torch.tensor([[[[1.0, -4.0], [2.0, 0.0]]]]))
    assert m.tolist() == [[[[0.25, 1.0], [0.5, 0.0]]]]


def test_gradient_finds_the_planted_pattern():
    data = PlantedPatterns(6, patch=12, seed=2)
    masks = gradient_saliency(PatternClassifier(patch=12), data.images, data.labels)
    for mask, (x0, y0, x1, y1) in zip(masks, data.boxes.tolist()):
        # the matched filter only has gradient where its best match sits
        assert mask[0, y0 : y1 + 1, x0 : x1 + 1].sum() > 0.9 * mask.sum()


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_gives_masks(name):
    needs = {"Grad-CAM (grad-cam)": "pytorch_grad_cam", "Saliency (captum)": "captum", "Occlusion (captum)": "captum"}
    if name in needs and importlib.util.find_spec(needs[name]) is None:
        pytest.skip(f"{needs[name]} is not installed (the bench extra)")
    classifier = tiny_cnn(4).eval()
    masks = BASELINES[name](classifier, torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    assert masks.shape == (3, 1, 32, 32)
    assert 0 <= masks.min() and masks.max() <= 1 and torch.isfinite(masks).all()


def test_peer_adapters_skip_cleanly_without_their_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_peers(name, *args, **kwargs):
        if name.startswith(("pytorch_grad_cam", "captum")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peers)
    for name in ("Grad-CAM (grad-cam)", "Saliency (captum)"):
        with pytest.raises(ImportError, match="bench"):
            BASELINES[name](tiny_cnn(4), torch.randn(1, 3, 32, 32), [0])
