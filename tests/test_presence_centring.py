"""presence_reference: class scores centred per image, so the share of classes the filter calls
present does not move with a shift every class's score shares (docs/objective.md)."""

import json

import pytest
import torch

from blackbox_saliency import Explainer, ExplainerConfig, get_recipe
from blackbox_saliency.masking_model import FeatureFilter

from conftest import SMALL, tiny_cnn


def _shared_channel_filter(reference, std_threshold=None):
    """Four classes over five channels: channel 0 adds the same amount to every class's score
    (what a brighter or sharper kind of image does to all of them), channel k+1 is class k's own."""
    ff = FeatureFilter(4, 5, presence_reference=reference, presence_std_threshold=std_threshold)
    with torch.no_grad():
        ff.embedding.weight.zero_()
        ff.embedding.weight[:, 0] = 1.0
        ff.embedding.weight[torch.arange(4), torch.arange(1, 5)] = 1.0
    return ff


def _features(shared: float) -> torch.Tensor:
    features = torch.zeros(2, 5, 3, 3)
    features[:, 0] = shared
    features[0, 2, 1, 1] = 4.0  # class 1 is in image 0
    features[1, 4, 0, 2] = 4.0  # class 3 is in image 1
    return features


def test_a_shift_shared_by_every_class_moves_nothing_once_centred():
    centred, plain = _shared_channel_filter(-1.0), _shared_channel_filter(None)
    low, high = _features(-6.0), _features(3.0)
    assert torch.allclose(centred.class_logits(low), centred.class_logits(high))
    ids = torch.tensor([1, 0])
    _, attention_low, presence_low = centred(low, ids)
    _, attention_high, presence_high = centred(high, ids)
    assert torch.allclose(attention_low, attention_high) and torch.allclose(presence_low, presence_high)
    # without centring the shared shift decides which classes count as present
    assert (plain.class_logits(high) > 0).all() and (plain.class_logits(low) < 0).all()
    # centred: the class in the image scores above zero, the others below, whatever the shift
    present = centred.class_logits(high) > 0
    assert present.tolist() == [[False, True, False, False], [False, False, False, True]]


def test_each_images_mean_score_equals_the_reference():
    ff = FeatureFilter(6, 8, presence_reference=0.25)
    scores = ff.class_logits(torch.randn(3, 8, 4, 4) * 5 + 2)
    assert torch.allclose(scores.mean(1), torch.full((3,), 0.25), atol=1e-5)
    raw = ff.raw_class_logits(torch.ones(1, 8, 2, 2))
    shift, scale = ff._normalisation(raw)
    assert torch.allclose(raw.mean(1) - shift, torch.tensor([0.25])) and scale.tolist() == [1.0]


@pytest.mark.parametrize("bad", ["1", True, float("nan"), float("inf")])
def test_bad_references_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="presence_reference"):
        Explainer(num_classes=4, **SMALL, presence_reference=bad)


def test_centre_presence_measures_sets_and_is_saved(tmp_path):
    torch.manual_seed(0)
    explainer = Explainer(num_classes=4, **SMALL).train()
    images = torch.randn(5, 3, 32, 32)
    before = explainer.eval().masking_model.presence(images).detach()
    explainer.train()
    reference = explainer.centre_presence(images, batch_size=2)
    assert explainer.training  # the mode it was in is kept
    assert reference == pytest.approx(before.mean(1).mean().item(), abs=1e-5)
    assert explainer.config.presence_reference == reference
    explainer.eval()
    after = explainer.masking_model.presence(images).detach()
    # each image moves by its own mean less the reference; the order of classes stays
    assert torch.allclose(after - before, (reference - before.mean(1))[:, None].expand_as(before), atol=1e-5)
    explainer.save_pretrained(tmp_path / "e")
    assert json.loads((tmp_path / "e" / "config.json").read_text())["presence_reference"] == reference
    loaded = Explainer.from_pretrained(tmp_path / "e")
    assert loaded.masking_model.feature_filter.presence_reference == reference
    assert torch.equal(loaded(images, [0, 1, 2, 3, 0]), explainer(images, [0, 1, 2, 3, 0]))


def test_centre_presence_refuses_bad_input_by_name():
    explainer = Explainer(num_classes=4, **SMALL)
    with pytest.raises(ValueError, match="batch_size"):
        explainer.centre_presence(torch.randn(2, 3, 32, 32), batch_size=0)
    with pytest.raises(ValueError, match="images"):
        explainer.centre_presence(torch.randn(2, 1, 32, 32))
    assert explainer.config.presence_reference is None  # nothing set by a refused call


def test_configs_without_the_field_load_uncentred():
    values = Explainer(num_classes=4, **SMALL).config.to_dict()
    del values["presence_reference"]
    assert ExplainerConfig.from_dict(values).presence_reference is None


# presence_std_threshold: scores standardised per image over the classes


def test_a_shift_and_scale_shared_by_every_class_move_nothing_once_standardised():
    ff = _shared_channel_filter(None, std_threshold=1.0)
    base = _features(0.5)
    scaled = base * 3.0  # every score three times larger: a sharper kind of image
    scaled[:, 0] = -2.0  # and shifted by the shared channel
    assert torch.allclose(ff.class_logits(base), ff.class_logits(scaled), atol=1e-5)
    ids = torch.tensor([1, 3])
    _, attention_base, presence_base = ff(base, ids)
    _, attention_scaled, presence_scaled = ff(scaled, ids)
    assert torch.allclose(presence_base, presence_scaled, atol=1e-5)
    # the class in the image stands 1.5 deviations above the four classes' mean, the others below
    present = ff.class_logits(base) > 0
    assert present.tolist() == [[False, True, False, False], [False, False, False, True]]
    assert torch.allclose(presence_base, torch.tensor([0.5, 0.5]), atol=1e-5)
    # the filtered map itself moves only by the scale: the attention is the same everywhere
    assert torch.allclose(attention_base, attention_scaled, atol=1e-5)


def test_standardised_scores_have_the_threshold_below_zero_as_mean_and_unit_deviation():
    ff = FeatureFilter(6, 8, presence_std_threshold=2.0)
    scores = ff.class_logits(torch.randn(3, 8, 4, 4) * 5 + 2)
    assert torch.allclose(scores.mean(1), torch.full((3,), -2.0), atol=1e-4)
    assert torch.allclose(scores.std(1), torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("bad", ["2", True, float("nan"), float("-inf")])
def test_bad_std_thresholds_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="presence_std_threshold"):
        Explainer(num_classes=4, **SMALL, presence_std_threshold=bad)


@pytest.mark.parametrize("bad", ["2", True, float("nan"), float("-inf")])
def test_bad_std_thresholds_in_a_recipe_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"model\.presence_std_threshold"):
        get_recipe("small").replace(**{"model.presence_std_threshold": bad})


def test_a_recipes_std_threshold_goes_into_the_explainer_it_builds():
    from blackbox_saliency.training import build_explainer

    assert get_recipe("timm").model.presence_std_threshold == 2.0  # the shipped Lite0 explainer's
    recipe = get_recipe("small").replace(model={"presence_std_threshold": 2.5, "encoder_kwargs": SMALL["encoder_kwargs"]})
    explainer = build_explainer(tiny_cnn(4), recipe, torch.zeros(3, 32, 32), 4, torch.device("cpu"))
    assert explainer.config.presence_std_threshold == 2.5
    assert explainer.masking_model.feature_filter.presence_std_threshold == 2.5


def test_centring_and_standardising_are_not_combined():
    with pytest.raises(ValueError, match="presence_std_threshold.*presence_reference"):
        Explainer(num_classes=4, **SMALL, presence_reference=0.0, presence_std_threshold=2.0)
    explainer = Explainer(num_classes=4, **SMALL, presence_std_threshold=2.0)
    with pytest.raises(ValueError, match="centre_presence: this explainer standardises"):
        explainer.centre_presence(torch.randn(2, 3, 32, 32))
    assert explainer.config.presence_reference is None  # nothing changed


def test_std_threshold_is_saved_loaded_and_shown_in_the_card(tmp_path):
    torch.manual_seed(0)
    explainer = Explainer(num_classes=4, **SMALL, presence_std_threshold=2.5).eval()
    images = torch.randn(2, 3, 32, 32)
    explainer.save_pretrained(tmp_path / "e")
    assert json.loads((tmp_path / "e" / "config.json").read_text())["presence_std_threshold"] == 2.5
    assert "standardised per image, present 2.5 deviations above the mean" in (tmp_path / "e" / "README.md").read_text()
    loaded = Explainer.from_pretrained(tmp_path / "e").eval()
    assert loaded.masking_model.feature_filter.presence_std_threshold == 2.5
    assert torch.allclose(loaded(images, [0, 1]), explainer(images, [0, 1]))
