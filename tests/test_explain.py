import warnings

import pytest
import torch

import blackbox_saliency.api as api
from blackbox_saliency import Explainer, explain

from conftest import SMALL, ConstantLogits, tiny_cnn


@pytest.fixture
def explainer():
    return Explainer(num_classes=4, **SMALL).eval()


def test_explain_with_explainer_matches_one_forward_pass(explainer):
    x = torch.randn(5, 3, 32, 32)
    ids = torch.tensor([0, 1, 2, 3, 0])
    masks = explain(tiny_cnn(), x, ids, explainer=explainer, batch_size=2)
    assert masks.shape == (5, 1, 32, 32) and masks.dtype == torch.float32
    assert 0 <= masks.min() and masks.max() <= 1
    with torch.no_grad():
        assert torch.allclose(masks, explainer(x, ids), atol=1e-6)


def test_class_ids_as_int_list_or_tensor(explainer):
    x = torch.randn(3, 3, 32, 32)
    a = explain(tiny_cnn(), x, 2, explainer=explainer)
    b = explain(tiny_cnn(), x, [2, 2, 2], explainer=explainer)
    c = explain(tiny_cnn(), x, torch.tensor([2, 2, 2]), explainer=explainer)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_optimize_runs_and_leaves_the_classifier_alone():
    classifier = tiny_cnn().train()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    masks = explain(classifier, torch.randn(2, 3, 32, 32), [0, 1], method="optimize", steps=5)
    assert masks.shape == (2, 1, 32, 32) and 0 <= masks.min() and masks.max() <= 1
    assert classifier.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in classifier.parameters())


def test_optimize_finds_the_planted_pattern():
    from blackbox_saliency.testing import PatternClassifier, PlantedPatterns, paired_box_iou, mask_boxes

    data = PlantedPatterns(8, patch=12, seed=3)
    masks = explain(PatternClassifier(patch=12), data.images, data.labels, method="optimize", steps=150)
    inside = torch.stack([masks[i, 0, y0 : y1 + 1, x0 : x1 + 1].mean() for i, (x0, y0, x1, y1) in enumerate(data.boxes.tolist())])
    # the mask is brighter on the planted patch than elsewhere for most images
    assert (inside > masks.mean(dim=(1, 2, 3)) * 1.5).float().mean() >= 0.75


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(api, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explain(tiny_cnn(), torch.randn(1, 3, 16, 16), 0, steps=1)
        explain(tiny_cnn(), torch.randn(1, 3, 16, 16), 0, steps=1)
    assert sum("iterative optimisation" in str(w.message) for w in caught) == 1


def test_method_explainer_needs_one():
    with pytest.raises(ValueError, match="explainer"):
        explain(tiny_cnn(), torch.randn(1, 3, 16, 16), 0, method="explainer")


@pytest.mark.parametrize(
    "images,ids,match",
    [
        (torch.randn(3, 32, 32), 0, "images: expected shape"),
        (torch.randn(1, 1, 32, 32), 0, "channels"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 0, "floating-point"),
        (torch.full((1, 3, 32, 32), float("nan")), 0, "NaN"),
        (torch.randn(0, 3, 32, 32), 0, "empty"),
        (torch.randn(1, 3, 2, 2), 0, "at least 4x4"),
        (torch.randn(2, 3, 32, 32), 4, "class id 4 is out of range"),
        (torch.randn(2, 3, 32, 32), [0], "1 class ids for 2 images"),
        (torch.randn(2, 3, 32, 32), torch.tensor([0.5, 1.0]), "integer tensor"),
        ([[0.0]], 0, "torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(explainer, images, ids, match):
    with pytest.raises((ValueError, TypeError), match=match):
        explain(tiny_cnn(), images, ids, explainer=explainer)


def test_classifier_with_wrong_output_shape():
    with pytest.raises(ValueError, match=r"classifier: must return logits of shape \(N, K\)"):
        explain(lambda x: x.mean(dim=(2, 3, 1)), torch.randn(2, 3, 16, 16), 0, method="optimize", steps=1)
    with pytest.raises(TypeError, match="classifier"):
        explain("not a model", torch.randn(2, 3, 16, 16), 0)


def test_class_id_out_of_range_for_the_classifier():
    with pytest.raises(ValueError, match="out of range for 3 classes"):
        explain(ConstantLogits([0.0, 1.0, 2.0]), torch.randn(1, 3, 16, 16), 3, method="optimize", steps=1)
