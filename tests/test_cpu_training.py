"""What makes CPU training fast and class-selective: in-memory batches, bf16 and channels-last,
the embedding stage, the presence loss, and the class filter on every scale."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blackbox_saliency import Explainer, fit_explainer
from blackbox_saliency.datasets import DecodedImages
from blackbox_saliency.evidence import gaussian_blur
from blackbox_saliency.masking_model import MaskingModel
from blackbox_saliency.encoders import SmallEncoder
from blackbox_saliency.training import EARLIER_DEFAULTS, presence_loss, removed_peak_images, removed_peak_loss

from conftest import SMALL, tiny_cnn


def _decoded(n=16, size=32, stored=16, **kwargs):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, stored, stored), dtype=torch.uint8, generator=g)
    return DecodedImages(images, torch.arange(n) % 4, size=size, **kwargs)


def test_decoded_images_normalise_and_resize_like_a_float_pipeline():
    data = _decoded(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    images, labels = data.batch(torch.tensor([3, 5]))
    expected = F.interpolate(data.images[[3, 5]].float() / 255, size=(32, 32), mode="bilinear", align_corners=False,
                             antialias=True)
    expected = (expected - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(images, expected, atol=1e-5) and labels.tolist() == [3, 1]
    item, label = data[5]
    assert torch.allclose(item, expected[1], atol=1e-5) and label == 1


def test_random_crops_are_crops_and_repeat_under_a_seed():
    # a horizontal ramp: any square crop resized keeps increasing from left to right
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).view(1, 1, 1, 16).expand(4, 3, 16, 16).contiguous()
    data = DecodedImages(ramp, [0, 1, 2, 3], size=24, crop_scale=(0.25, 0.5))
    torch.manual_seed(1)
    a, _ = data.batch(torch.arange(4))
    torch.manual_seed(1)
    b, _ = data.batch(torch.arange(4))
    assert torch.equal(a, b)
    whole, _ = DecodedImages(ramp, [0, 1, 2, 3], size=24).batch(torch.arange(4))
    rows = a[:, 0, 12]
    assert (rows[:, 1:] >= rows[:, :-1] - 1e-5).all()
    # a crop of a quarter to a half of the area spans less of the ramp than the whole image
    assert ((rows[:, -1] - rows[:, 0]) < (whole[:, 0, 12, -1] - whole[:, 0, 12, 0]) - 0.1).all()


def test_decode_from_pil_items_and_subset():
    items = [(Image.new("RGB", (20, 10) if i == 2 else (10, 10), (i * 40, 0, 0)), i) for i in range(4)]
    data = DecodedImages.decode(items, size=10, progress=False)
    assert data.images.shape == (4, 3, 10, 10) and data.labels.tolist() == [0, 1, 2, 3]
    assert int(data.images[3, 0, 5, 5]) == 120
    part = data.subset([3, 1])
    assert part.labels.tolist() == [3, 1] and torch.equal(part.images[0], data.images[3])


@pytest.mark.parametrize("kwargs, match", [
    ({"images": torch.zeros(2, 3, 8, 8)}, "images: expected a uint8"),
    ({"labels": [0]}, "labels: expected 2"),
    ({"size": (0, 4)}, "size"),
    ({"crop_scale": (0.5, 1.5)}, "crop_scale"),
    ({"mean": (0.5,)}, "mean, std"),
])
def test_decoded_images_bad_arguments(kwargs, match):
    args = {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "labels": [0, 1], "size": 8}
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=match):
        DecodedImages(**args)


def test_fit_reads_whole_batches_from_a_batch_dataset():
    data = _decoded(n=32, size=32)
    calls = []
    original = data.batch

    def spy(indices):
        calls.append(len(indices))
        return original(indices)

    data.batch = spy
    fit_explainer(tiny_cnn(), data, epochs=1, batch_size=8, max_steps=3, progress=False, **SMALL)
    assert calls == [8, 8, 8]


def test_blur_in_bf16_and_channels_last_matches_float32():
    x = torch.randn(2, 3, 40, 40)
    reference = gaussian_blur(x, 3.0)
    fast = gaussian_blur(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), 3.0)
    assert fast.dtype == torch.bfloat16 and (fast.float() - reference).abs().max() < 0.05


def test_presence_loss_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    # present: softplus(-2); absent: mean of softplus(-1) and softplus(0); halves of each
    expected = 0.5 * (F.softplus(torch.tensor(-2.0)) + 0.5 * (F.softplus(torch.tensor(-1.0)) + F.softplus(torch.tensor(0.0))))
    assert torch.allclose(presence_loss(logits, torch.tensor([0])), expected)


def test_presence_loss_with_the_prediction_also_present_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    # present: mean of softplus(-2) and softplus(0); absent: softplus(-1) alone
    expected = 0.5 * (0.5 * (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(0.0))) + F.softplus(torch.tensor(-1.0)))
    assert torch.allclose(presence_loss(logits, torch.tensor([0]), torch.tensor([2])), expected)
    # a prediction equal to the label changes nothing
    assert torch.allclose(presence_loss(logits, torch.tensor([0]), torch.tensor([0])), presence_loss(logits, torch.tensor([0])))


def test_presence_targets_teach_the_embedding_the_classifiers_prediction():
    # the classifier names class 3 for every image; the labels cycle through 0-3
    classifier = tiny_cnn()
    with torch.no_grad():
        classifier[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    data = _decoded(n=32)
    seen = {}
    for targets in ("class", "class_and_prediction"):
        explainer = fit_explainer(classifier, data, epochs=20, batch_size=8, max_steps=60, embedding_steps=60,
                                  presence_targets=targets, seed=0, progress=False, **SMALL)
        assert explainer.config.training["presence_targets"] == targets
        images, labels = data.batch(torch.arange(32))
        with torch.no_grad():
            seen[targets] = torch.sigmoid(explainer.masking_model.presence(images))[labels != 3, 3].mean().item()
    # told that class 3 is present wherever the classifier names it, the embedding sees it there
    assert seen["class_and_prediction"] > seen["class"] + 0.2


def test_embedding_stage_trains_only_the_embedding_and_encoder():
    torch.manual_seed(0)
    reference = Explainer(4, **SMALL).state_dict()
    # one encoder, as the reference has (with the gate's own copy, the stage trains that copy)
    explainer = fit_explainer(tiny_cnn(), _decoded(n=32), epochs=10, batch_size=8, max_steps=4, embedding_steps=4,
                              progress=False, **SMALL, **EARLIER_DEFAULTS)
    state = explainer.state_dict()
    changed = {k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, reference[k])}
    assert any(k.startswith("masking_model.feature_filter") for k in changed)
    assert any(k.startswith("masking_model.encoder") for k in changed)
    assert not any(k.startswith(("masking_model.upsamplers", "masking_model.head")) for k in changed)


def test_filter_on_every_scale_blocks_skip_features_where_the_class_is_not_seen():
    torch.manual_seed(0)
    model = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=3, class_filter="all").eval()
    with torch.no_grad():
        model.feature_filter.embedding.weight[1] = -100.0  # class 1 is seen nowhere: attention 0
        x = torch.randn(2, 3, 32, 32)
        seen = model(x, torch.tensor([1, 1])).mask
        other = model(x + torch.randn_like(x), torch.tensor([1, 1])).mask
    # with every feature filtered out, the mask no longer depends on the image
    assert torch.allclose(seen, other, atol=1e-4)
    paper = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=3, class_filter="bottleneck").eval()
    with torch.no_grad():
        paper.feature_filter.embedding.weight[1] = -100.0
        assert not torch.allclose(paper(x, torch.tensor([1, 1])).mask, paper(x + torch.randn_like(x), torch.tensor([1, 1])).mask)


def test_old_configs_load_with_the_papers_filter():
    config = Explainer(4, **SMALL).config.to_dict()
    config.pop("class_filter")
    assert Explainer.from_config(config).masking_model.class_filter == "bottleneck"


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "fp16"}, "precision"),
    ({"channels_last": "yes"}, "channels_last"),
    ({"embedding_loss": "max"}, "embedding_loss"),
    ({"embedding_steps": -1}, "embedding_steps"),
    ({"presence_targets": "prediction"}, "presence_targets"),
    ({"class_filter": "skips"}, "class_filter"),
    ({"removed_peak_weight": -1.0}, "removed_peak_weight"),
    ({"removed_peak_cells": 2}, "removed_peak_cells"),
    ({"removed_peak_weight": 1.0, "removed_peak_skip_background": 0.0}, "removed_peak_skip_background"),
    ({"removed_peak_weight": 1.0, "removed_peak_skip_background": "0.5"}, "removed_peak_skip_background"),
    ({"removed_peak_weight": 0.0, "removed_peak_skip_background": 0.5},
     "removed_peak_skip_background"),  # without the loss it applies to
])
def test_bad_training_options_are_named(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fit_explainer(tiny_cnn(), _decoded(n=8), epochs=1, batch_size=4, progress=False, **SMALL, **kwargs)


def test_fp32_and_bf16_training_both_run_and_restore_the_classifier_layout():
    classifier = tiny_cnn()
    for precision in ("fp32", "bf16"):
        explainer = fit_explainer(classifier, _decoded(n=16), epochs=1, batch_size=8, precision=precision,
                                  channels_last=True, progress=False, **SMALL)
        assert explainer.config.training["precision"] == precision
        assert classifier[0].weight.is_contiguous()
        assert next(explainer.parameters()).is_contiguous()


def test_auto_precision_picks_bf16_per_part_only_where_it_is_clearly_faster(monkeypatch):
    from blackbox_saliency import _precision

    explainer = Explainer(4, **SMALL)
    # the passes' seconds in the order they are timed: masking model fp32, bf16; classifier fp32,
    # bf16; then, if the run has one, the embedding stage's fp32, bf16
    for times, expected in (([1.0, 0.5, 1.0, 0.95], (True, False, True)),   # a near tie keeps float32
                            ([0.5, 1.0, 1.0, 0.8], (False, True, False)),
                            ([0.001, 0.01, 0.001, 0.0005], (True, True, True)),  # too quick to time: the default
                            ([0.5, 1.0, 1.0, 1.0, 1.0, 0.5], (False, False, True))):
        script = iter(times)
        monkeypatch.setattr(_precision, "_seconds", lambda step, repeats: next(script))
        parts = _precision.measure_parts(tiny_cnn(), explainer.masking_model, torch.Size([3, 16, 16]), 2, 4,
                                         torch.device("cpu"), channels_last=False, default=True,
                                         embedding_stage=len(times) == 6)
        assert (parts.masking_model, parts.classifier, parts.embedding_stage) == expected
        assert _precision.PartPrecision.from_dict(parts.to_dict()) == parts
        assert next(script, None) is None  # every pass timed, none twice


def test_timing_the_parts_leaves_no_trace():
    from blackbox_saliency import _precision

    torch.manual_seed(0)
    explainer, classifier = Explainer(4, **SMALL).train(), tiny_cnn()
    before = {k: v.clone() for k, v in explainer.state_dict().items()}
    rng = torch.get_rng_state()
    _precision.measure_parts(classifier, explainer.masking_model, torch.Size([3, 16, 16]), 4, 4,
                             torch.device("cpu"), channels_last=True, repeats=1)
    assert torch.equal(rng, torch.get_rng_state())  # training's random draws are not shifted
    assert all(torch.equal(before[k], v) for k, v in explainer.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in explainer.parameters())


def test_a_classifier_under_its_own_precision_inside_autocast():
    from blackbox_saliency._precision import with_precision

    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert with_precision(layer, False, "cpu")(x).dtype == torch.float32
        assert with_precision(layer, False, "cpu")(x.bfloat16()).dtype == torch.float32
    assert with_precision(layer, True, "cpu")(x).dtype == torch.bfloat16
    double = torch.nn.Linear(4, 3).double()
    assert with_precision(double, False, "cpu")(x.double()).dtype == torch.float64  # never cast down


def test_an_auto_run_records_its_parts_and_a_resumed_run_keeps_them(tmp_path, monkeypatch):
    from blackbox_saliency import training
    from blackbox_saliency._precision import PartPrecision

    monkeypatch.setattr(training, "_use_bf16", lambda precision, device: precision != "fp32")  # any CPU
    monkeypatch.setattr(training, "measure_parts", lambda *args, **kwargs: PartPrecision(True, False, False))
    common = dict(epochs=2, batch_size=8, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1, **SMALL)
    first = fit_explainer(tiny_cnn(), _decoded(n=16), max_steps=2, **common)
    assert first.config.training["precision"] == "mixed"
    parts = {"masking_model": "bf16", "classifier": "fp32", "embedding_stage": "fp32"}
    assert first.config.training["precision_parts"] == parts

    def not_again(*args, **kwargs):
        raise AssertionError("a resumed run timed the parts again")

    monkeypatch.setattr(training, "measure_parts", not_again)
    resumed = fit_explainer(tiny_cnn(), _decoded(n=16), resume=True, **common)
    assert resumed.config.training["steps"] == 4
    assert resumed.config.training["precision_parts"] == parts
    explicit = fit_explainer(tiny_cnn(), _decoded(n=16), epochs=1, batch_size=8, progress=False, precision="bf16", **SMALL)
    assert "precision_parts" not in explicit.config.training  # asked for: nothing timed


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


@pytest.mark.parametrize("cells, rows, cols", [(1, (8, 16), (16, 24)), (3, (0, 24), (8, 30))])
def test_removed_peak_images_replace_the_cells_around_the_peak(cells, rows, cols):
    model, features = _peaked_model_and_features()
    images = torch.rand(1, 3, 30, 30)  # padded to 32 for the encoder: the region is cropped back
    removed = removed_peak_images(model, images, torch.tensor([0]), features, cells, blur_prob=0.0)
    expected = torch.zeros(30, 30, dtype=torch.bool)
    expected[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert torch.equal((removed != images).any(1)[0], expected)


def test_removed_peak_loss_targets_what_the_classifier_sees_once_the_peak_is_gone():
    model, features = _peaked_model_and_features()
    images = torch.zeros(1, 3, 32, 32)
    images[..., 8:16, 16:24] = 1.0  # the evidence, under class 0's peak

    def classifier(x):  # class 0 in proportion to the evidence's brightness
        return torch.stack([20 * x[:, :, 8:16, 16:24].mean((1, 2, 3)) - 18, torch.zeros(len(x))], 1)

    labels = torch.tensor([0])
    torch.manual_seed(1)
    loss = removed_peak_loss(classifier, model, images, labels, features, 1, blur_prob=1.0)
    torch.manual_seed(1)
    removed = removed_peak_images(model, images, labels, features, 1, blur_prob=1.0)
    seen = torch.softmax(classifier(removed), 1)[:, 0]
    assert seen.item() < 0.5 < torch.softmax(classifier(images), 1)[0, 0].item()  # removing the peak removed the class
    logit = model.presence(removed)[:, 0]
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logit, seen))


def test_removed_peak_skip_background_leaves_out_the_images_whose_class_survives_a_blur():
    # image 0: class 0 sits in sharp evidence a blur destroys; image 1: class 1 is what the
    # classifier calls any smooth image, so removing its peak cannot make it absent
    model, _ = _peaked_model_and_features()
    # the presence logit on what is left: 2 for both classes (a random encoder's features are
    # near 0, and a logit of 0 costs log 2 whatever the target)
    model._features = lambda x, encoder=None: [torch.full((len(x), 32, 4, 4), 2.0)]
    with torch.no_grad():
        model.feature_filter.embedding.weight[1, 0] = 1.0
    images = torch.zeros(2, 3, 32, 32)
    images[0, :, 8:16, 16:24] = torch.tensor([[1.0, -1.0] * 4] * 8)  # stripes: zero once blurred
    features = torch.zeros(2, 32, 4, 4)
    features[0, 0, 1, 2] = 5.0

    def classifier(x):  # class 0 from the stripes' contrast, class 1 otherwise
        contrast = (x[:, :, 8:16, 16:24] - x[:, :, 8:16, 16:24].mean((2, 3), keepdim=True)).abs().mean((1, 2, 3))
        return torch.stack([20 * contrast - 10, torch.zeros(len(x))], 1)

    labels = torch.tensor([0, 1])
    bare = gaussian_blur(images, 32 * 10 / 224)
    survives = torch.softmax(classifier(bare), 1)[torch.arange(2), labels]
    assert survives[0] < 0.5 < survives[1]  # the setup: only class 1 survives a whole-image blur
    per_image = []
    for i in range(2):
        torch.manual_seed(1)
        per_image.append(removed_peak_loss(classifier, model, images[i:i + 1], labels[i:i + 1], features[i:i + 1], 1,
                                           blur_prob=1.0))
    torch.manual_seed(1)
    both = removed_peak_loss(classifier, model, images, labels, features, 1, blur_prob=1.0)
    torch.manual_seed(1)
    skipped = removed_peak_loss(classifier, model, images, labels, features, 1, blur_prob=1.0, skip_background=0.5)
    assert torch.allclose(both, (per_image[0] + per_image[1]) / 2)
    assert not torch.allclose(per_image[0], per_image[1])
    assert torch.allclose(skipped, per_image[0])  # image 1 contributes nothing
    torch.manual_seed(1)
    nothing_left = removed_peak_loss(classifier, model, images[1:], labels[1:], features[1:], 1, blur_prob=1.0,
                                     skip_background=0.5)
    assert nothing_left.item() == 0.0


def test_removed_peak_skip_background_reaches_the_loss_and_is_recorded(monkeypatch):
    import blackbox_saliency.training as training

    seen, original = [], training.removed_peak_loss

    def spy(*args, skip_background=None, **kwargs):
        seen.append(skip_background)
        return original(*args, skip_background=skip_background, **kwargs)

    monkeypatch.setattr(training, "removed_peak_loss", spy)
    explainer = fit_explainer(tiny_cnn(), _decoded(n=16), epochs=10, batch_size=8, max_steps=3, embedding_steps=2,
                              removed_peak_weight=1.0, removed_peak_skip_background=0.5, seed=0, progress=False,
                              **SMALL)
    assert seen == [0.5, 0.5]
    assert explainer.config.training["removed_peak_skip_background"] == 0.5


def test_removed_peak_weight_changes_only_the_embedding_stage_and_is_recorded():
    data = _decoded(n=32)
    runs = {}
    for weight in (0.0, 1.0):
        runs[weight] = fit_explainer(tiny_cnn(), data, epochs=10, batch_size=8, max_steps=6, embedding_steps=4,
                                     removed_peak_weight=weight, seed=0, progress=False, **SMALL)
        assert runs[weight].config.training["removed_peak_weight"] == weight
    embedding = "masking_model.feature_filter.embedding.weight"
    assert not torch.equal(runs[0.0].state_dict()[embedding], runs[1.0].state_dict()[embedding])


def test_removed_peak_replaces_the_region_by_a_blurred_copy_whatever_the_objective(monkeypatch):
    # a random-colour square shut classes' gates on the planted task (docs/fit.md); the mask
    # stage keeps the objective's own mix (here all random colour)
    import blackbox_saliency.training as training

    seen, original = [], training.removed_peak_loss

    def spy(classifier, masking_model, images, labels, features, cells, blur_prob, shard=training.LOCAL, **kwargs):
        seen.append(blur_prob)
        return original(classifier, masking_model, images, labels, features, cells, blur_prob, shard, **kwargs)

    monkeypatch.setattr(training, "removed_peak_loss", spy)
    fit_explainer(tiny_cnn(), _decoded(n=16), epochs=10, batch_size=8, max_steps=3, embedding_steps=2,
                  removed_peak_weight=1.0, objective={"blur_prob": 0.0}, seed=0, progress=False, **SMALL)
    assert seen == [1.0, 1.0]
