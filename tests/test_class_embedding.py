"""class_embedding="classifier_head": class embeddings derived from the classifier's head rows."""

import pytest
import torch

from blackbox_saliency import Explainer, ExplainerConfig, fit_explainer, get_recipe
from blackbox_saliency._blackbox import head_weight
from blackbox_saliency.testing import PlantedPatterns

from conftest import SMALL, tiny_cnn

HEAD = {**SMALL, "class_embedding": "classifier_head", "class_embedding_features": 8}


def head_recipe(name="small", **changes):
    """``name``'s recipe with class embeddings from the classifier's head, on the tiny encoder, in float32."""
    return get_recipe(name).replace(**{"model.class_embedding": "classifier_head", "model.encoder_kwargs":
                                       SMALL["encoder_kwargs"], "schedule.batch_size": 8, "runtime.precision": "fp32",
                                       **changes})


def test_classes_with_the_same_head_row_get_the_same_mask():
    explainer = Explainer(num_classes=4, **HEAD).eval()
    rows = torch.randn(4, 8)
    rows[3] = 2.5 * rows[1]  # same direction: the embedding uses the unit row
    explainer.masking_model.feature_filter.set_head(rows)
    images = torch.randn(2, 3, 32, 32)
    same = [explainer.masks_with_details(images, torch.tensor([c, c])) for c in (1, 3)]
    other = explainer.masks_with_details(images, torch.tensor([2, 2]))
    assert torch.allclose(same[0].mask, same[1].mask, atol=1e-6)
    assert torch.allclose(same[0].presence_logit, same[1].presence_logit, atol=1e-6)
    assert not torch.allclose(same[0].presence_logit, other.presence_logit, atol=1e-3)


def test_the_learned_embedding_keeps_one_vector_per_class():
    explainer = Explainer(num_classes=4, **SMALL).eval()
    assert explainer.config.class_embedding == "learned" and explainer.config.class_embedding_features is None
    assert explainer.masking_model.feature_filter.embeddings().shape == (4, 32)


def test_fit_reads_the_head_and_trains_the_map_not_the_rows():
    classifier = tiny_cnn(4)
    data = PlantedPatterns(32, patch=12, size=32)
    # the small recipe's shares of 3 steps: one embedding step, then two mask steps
    explainer = fit_explainer(classifier, data, head_recipe(), steps=3, device="cpu", progress=False)
    assert explainer.config.training["stage_ends"] == [1, 3]
    ff = explainer.masking_model.feature_filter
    assert explainer.config.class_embedding_features == 8
    assert torch.equal(ff.head_weight, classifier[-1].weight)
    assert "masking_model.feature_filter.head_weight" in dict(explainer.named_buffers())  # not a parameter
    torch.manual_seed(0)
    untrained = Explainer(num_classes=4, **{**HEAD}).masking_model.feature_filter.projection.weight
    assert not torch.equal(untrained, ff.projection.weight)


def test_the_class_embedding_keyword_names_the_recipe_setting():
    with pytest.raises(TypeError, match=r"class_embedding= is now model\.class_embedding"):
        fit_explainer(tiny_cnn(4), PlantedPatterns(16, patch=12, size=32), class_embedding="classifier_head")


def test_saved_and_loaded_with_the_head_rows(tmp_path):
    explainer = Explainer(num_classes=4, **HEAD).eval()
    explainer.masking_model.feature_filter.set_head(torch.randn(4, 8))
    explainer.save_pretrained(tmp_path / "e")
    loaded = Explainer.from_pretrained(tmp_path / "e")
    assert loaded.config == explainer.config
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(images, [0, 3]), explainer(images, [0, 3]))


def test_configs_without_the_field_load_as_learned():
    values = Explainer(num_classes=4, **SMALL).config.to_dict()
    del values["class_embedding"], values["class_embedding_features"]
    config = ExplainerConfig.from_dict(values)
    assert config.class_embedding == "learned" and config.class_embedding_features is None


@pytest.mark.parametrize("changes", [{"class_embedding": "classifier_head"},
                                     {"class_embedding_features": 8},
                                     {"class_embedding": "head"},
                                     {"class_embedding": "classifier_head", "class_embedding_features": 0}])
def test_inconsistent_settings_are_refused(changes):
    values = {**Explainer(num_classes=4, **SMALL).config.to_dict(), **changes}
    with pytest.raises(ValueError, match="class_embedding"):
        ExplainerConfig.from_dict(values)
    with pytest.raises(ValueError, match="class_embedding"):
        Explainer(num_classes=4, **{**SMALL, **changes})


def test_set_head_checks_the_shape():
    explainer = Explainer(num_classes=4, **HEAD)
    with pytest.raises(ValueError, match="weight"):
        explainer.masking_model.feature_filter.set_head(torch.randn(4, 9))


def test_head_weight_finds_the_final_layer_or_names_the_argument():
    classifier = tiny_cnn(4)
    assert torch.equal(head_weight(classifier, 4), classifier[-1].weight)
    conv_head = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(6, 4, 1), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten())
    assert head_weight(conv_head, 4).shape == (4, 6)
    with pytest.raises(ValueError, match="class_embedding"):
        head_weight(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), 4)


def test_fit_refuses_a_classifier_without_a_linear_head():
    classifier = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="class_embedding"):
        fit_explainer(classifier, PlantedPatterns(16, patch=12, size=32), head_recipe(), steps=1, device="cpu",
                      progress=False)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_classifier_features_start_the_embedding_as_class_activation_maps(name):
    import timm

    from blackbox_saliency.encoders import classifier_features

    classifier = timm.create_model(name, pretrained=False, num_classes=5).eval()
    with torch.no_grad():  # BatchNorm statistics that are not 0 / 1
        for m in classifier.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    encoder = classifier_features(classifier)
    head = classifier.get_classifier().weight
    explainer = Explainer(num_classes=5, encoder=encoder, class_embedding="classifier_head",
                          class_embedding_features=head.shape[1]).eval()
    explainer.masking_model.feature_filter.set_head(head, encoder.head_input_map)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = classifier.forward_features(images) if name == "resnet18" else classifier.blocks(
            classifier.bn1(classifier.conv_stem(images)))
        if name == "efficientnet_lite0":  # conv_head and BatchNorm's scale, not its shift or ReLU6
            bn = classifier.bn2
            z = torch.nn.functional.conv2d(x, classifier.conv_head.weight)
            x = z * (bn.weight / (bn.running_var + bn.eps).sqrt()).view(1, -1, 1, 1)
        cam = torch.einsum("nchw,kc->nkhw", x, torch.nn.functional.normalize(head, dim=1)).flatten(2).amax(2)
        assert torch.allclose(explainer.masking_model.presence(images), cam, rtol=1e-4, atol=1e-4)


def test_no_head_input_map_for_a_vit_pyramid():
    import timm

    from blackbox_saliency.encoders import classifier_features

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=1)
    assert not hasattr(classifier_features(vit), "head_input_map")  # its maps come from new layers


def test_an_explainer_without_head_rows_refuses_to_run():
    explainer = Explainer(num_classes=4, **HEAD).eval()  # zero rows: every class would look the same
    with pytest.raises(RuntimeError, match="set_head"):
        explainer(torch.randn(1, 3, 32, 32), [0])


class _TwoHeads(torch.nn.Module):
    """Logits are the mean of two heads (as a distilled DeiT's): neither head alone is the answer."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head, self.head_dist = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x):
        z = self.features(x)
        return (self.head(z) + self.head_dist(z)) / 2


def test_head_weight_refuses_a_layer_whose_output_is_not_the_logits():
    probe = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="class_embedding.*not its logits"):
        head_weight(_TwoHeads(), 4, probe)
    classifier = tiny_cnn(4)
    assert torch.equal(head_weight(classifier, 4, probe), classifier[-1].weight)


def test_head_weight_takes_timms_classifier_or_none():
    import timm

    headless = timm.create_model("resnet18", pretrained=False, num_classes=0)  # get_classifier() is Identity
    with pytest.raises(ValueError, match="get_classifier"):
        head_weight(headless, 512)
    strided = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="class_embedding"):
        head_weight(strided, 4)


def test_fit_starts_the_map_from_the_classifiers_head_input_path():
    import timm

    classifier = timm.create_model("resnet18", pretrained=False, num_classes=4)
    # the timm recipe: the classifier's own features, the map started from its head's input path
    # and kept fixed while the masks train (one stage, at full resolution, for speed)
    recipe = get_recipe("timm").replace(**{"schedule.stages": [{"kind": "masks", "share": 1.0, "filter": "fixed"}],
                                           "schedule.batch_size": 8, "runtime.precision": "fp32"})
    explainer = fit_explainer(classifier, PlantedPatterns(16, patch=12, size=32), recipe, steps=1, device="cpu",
                              progress=False)
    assert explainer.config.encoder == "resnet18" and explainer.config.class_embedding == "classifier_head"
    ff = explainer.masking_model.feature_filter
    assert torch.equal(ff.projection.weight, torch.eye(512))
    assert all(p.requires_grad for p in ff.parameters())  # what the stage froze is released after it


def test_fit_keeps_its_own_classifiers_head_over_init_from():
    classifier = tiny_cnn(4)
    data = PlantedPatterns(16, patch=12, size=32)
    first = fit_explainer(classifier, data, head_recipe(), steps=1, device="cpu", progress=False)
    other = tiny_cnn(4)  # another classifier of the same shape
    assert not torch.equal(other[-1].weight, classifier[-1].weight)
    second = fit_explainer(other, data, head_recipe(), steps=1, device="cpu", progress=False, init_from=first)
    assert torch.equal(second.masking_model.feature_filter.head_weight, other[-1].weight)
    assert second.config.training["init_from"] == "an Explainer object"
