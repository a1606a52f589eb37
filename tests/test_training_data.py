"""Training data: fit_explainer checks every item it reads, not only the first (issue #13): a bad
item deep in the dataset is named when its batch is assembled, in each of the three ways batches
are read (a DataLoader, ``runtime.preload``, a dataset's own ``batch(indices)``); the batches of
each epoch; DecodedImages; the per-batch sampling (square crops, resolution, flips); and batches
split into passes."""

import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from blackbox_saliency import fit_explainer
from blackbox_saliency.datasets import DecodedImages
from blackbox_saliency.recipes import Sampling, get_recipe
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns
from blackbox_saliency.training.data import (BatchSource, _CheckedCollate, check_values, dataset_labels, epoch_batches,
                                             sample, square_crops)
from blackbox_saliency.training.runtime import images_per_pass

from conftest import SMALL, tiny_cnn

CPU = torch.device("cpu")


def recipe(**changes):
    # the contiguous layout: channels-last (the CPU's default, covered in test_training_fit) is slower to start
    return get_recipe("small").replace(**{"model.encoder_kwargs": SMALL["encoder_kwargs"], "runtime.precision": "fp32",
                                          "runtime.channels_last": False, "schedule.batch_size": 8, **changes})


def _fit(data, classifier=None, runtime=None, **kwargs):
    kwargs = {"steps": 4, "progress": False, "device": "cpu", **kwargs}
    changes = {f"runtime.{k}": v for k, v in (runtime or {}).items()}
    return fit_explainer(PatternClassifier(patch=12) if classifier is None else classifier, data, recipe(**changes),
                         **kwargs)


def _items(n=32):
    """PlantedPatterns (4 classes, 32 px) as a list of (image, label) pairs, one to spoil."""
    data = PlantedPatterns(n, patch=12)
    return [data[i] for i in range(n)]


class BatchReader:
    """A dataset read a batch at a time, like DecodedImages; ``spoil`` edits what batch() returns."""

    def __init__(self, items, spoil=None):
        self.items, self.spoil = items, spoil

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def batch(self, indices):
        rows = indices.tolist()
        images = torch.stack([self.items[i][0] for i in rows])
        labels = torch.tensor([self.items[i][1] for i in rows])
        return self.spoil(rows, images, labels) if self.spoil else (images, labels)


LOADERS = [{}, {"preload": True}]  # a DataLoader, or everything read once up front


@pytest.mark.parametrize(
    "data,match",
    [
        (TensorDataset(torch.randn(0, 3, 32, 32), torch.zeros(0).long()), "dataset: is empty"),
        (TensorDataset(torch.randint(0, 255, (8, 3, 32, 32)), torch.zeros(8).long()), "float tensors"),
        (TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8)), "integer class ids"),
        (TensorDataset(torch.randn(8, 32, 32), torch.zeros(8).long()), r"has shape \(32, 32\)"),
        ([1, 2, 3], r"\(image, label\) pairs, but item 0 is a int"),
        ([(torch.randn(3, 32, 32).numpy(), 0)], "item 0's is a ndarray"),
        (iter([(torch.randn(3, 32, 32), 0)]), "map-style torch Dataset"),
    ],
)
def test_bad_datasets(data, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _fit(data)


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("index", [0, 21])
def test_an_item_that_is_not_a_pair_is_named(how, index):
    items = _items()
    image, label = items[index]
    items[index] = (image, label, "extra")
    with pytest.raises(TypeError, match=rf"dataset: .*\(image, label\) pairs.*item {index} is a tuple of 3"):
        _fit(items, runtime=how)


def test_a_batch_reader_returning_a_triple_is_refused():
    data = BatchReader(_items(), spoil=lambda rows, images, labels: (images, labels, rows))
    with pytest.raises(TypeError, match=r"dataset: batch\(indices\) must return \(images, labels\).*tuple of 3"):
        _fit(data)


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("label", [4, -1])
def test_a_label_out_of_range_is_named_with_its_item(how, label):
    items = _items()
    items[13] = (items[13][0], label)
    with pytest.raises(ValueError, match=rf"dataset: item 13 has label {label}, outside 0\.\.3 .*4 classes"):
        _fit(items, runtime=how)


def test_a_label_out_of_range_from_a_batch_reader():
    items = _items()
    items[13] = (items[13][0], 7)
    with pytest.raises(ValueError, match=r"dataset: item 13 has label 7"):
        _fit(BatchReader(items))


def _spoilt(value=float("nan"), at=(25,)):
    items = _items()
    for index in at:
        image = items[index][0].clone()
        image[1, 5, 7] = value
        items[index] = (image, items[index][1])
    return items


@pytest.mark.parametrize("how", [{}, {"preload": True}, {"reader": True}])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_image_deep_in_the_dataset_is_bad_data_not_a_learning_rate(tmp_path, how, value):
    items = _spoilt(value)
    how = dict(how)
    data = BatchReader(items) if how.pop("reader", False) else items
    where = "read by preload" if how else "in a training batch"
    # seed 3 puts item 25 in the last of the epoch's four batches
    bad_batch = next(b for b, rows in enumerate(epoch_batches(32, 8, 3, 0)) if 25 in rows)
    assert bad_batch == 3
    with pytest.raises(ValueError, match=rf"dataset: NaN or infinite values in item 25 \({where}\): bad data") as caught:
        _fit(data, runtime={"checkpoint_every": 1, **how}, checkpoint_dir=tmp_path, seed=3)
    assert "lr" not in str(caught.value)
    checkpoint = tmp_path / "last.pt"
    if how:  # preload reads every item before training: nothing was trained or saved
        assert not checkpoint.exists()
        return
    # the three steps before the bad batch were checkpointed, and never with weights it touched
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == bad_batch
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_every_bad_item_of_the_batch_is_listed():
    items = _spoilt(at=range(32))  # every item: the first batch read has 8 bad ones
    with pytest.raises(ValueError, match=r"dataset: NaN or infinite values in items (\d+, ){7}\d+ \(in a training batch\)"):
        _fit(items)


def test_huge_but_finite_images_are_accepted():
    # their sum overflows float32; only a non-finite sum triggers the closer look, which passes
    images = torch.full((16, 3, 32, 32), 3e38)
    check_values(images, torch.zeros(16, dtype=torch.long), list(range(16)), 4, "batch 1 of epoch 1")
    images[5, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"item 5 \(batch 1 of epoch 1\)"):
        check_values(images, torch.zeros(16, dtype=torch.long), list(range(16)), 4, "batch 1 of epoch 1")
    many = torch.full((12, 3, 4, 4), float("nan"))
    with pytest.raises(ValueError, match=r"items 100, 101, .*, 109 and 2 more \(here\)"):
        check_values(many, torch.zeros(12, dtype=torch.long), list(range(100, 112)), 4, "here")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_images_report_their_dtype_and_what_to_do(dtype):
    data = TensorDataset(torch.randint(0, 255, (16, 3, 32, 32)).to(dtype), torch.zeros(16).long())
    with pytest.raises(TypeError, match=rf"dataset: .*float tensors.*item 0.*{dtype}.*convert .*float.*normalis"):
        _fit(data)


@pytest.mark.parametrize("how", LOADERS)
def test_an_integer_image_deep_in_the_dataset_is_named(how):
    items = _items()
    items[19] = ((items[19][0] * 255).clamp(0, 255).to(torch.uint8), items[19][1])
    with pytest.raises(TypeError, match=r"item 19.*torch\.uint8"):
        _fit(items, runtime=how)


def test_a_batch_reader_returning_uint8_images_reports_the_dtype():
    data = BatchReader(_items(), spoil=lambda rows, images, labels: ((images * 255).to(torch.uint8), labels))
    with pytest.raises(TypeError, match=r"dataset: batch\(indices\).*torch\.uint8.*convert .*float"):
        _fit(data)


def test_a_batch_reader_returning_float_labels_or_a_wrong_count_is_refused():
    data = BatchReader(_items(), spoil=lambda rows, images, labels: (images, labels.float()))
    with pytest.raises(TypeError, match=r"batch\(indices\) must return .*8 integer labels, returned a torch.float32"):
        _fit(data)
    data = BatchReader(_items(), spoil=lambda rows, images, labels: (images[:-1], labels))
    with pytest.raises(ValueError, match=r"images \(8, 3, 32, 32\) for 8 indices .* returned \(7, 3, 32, 32\)"):
        _fit(data)


@pytest.mark.parametrize("how", LOADERS)
def test_mixed_image_sizes_name_both_sizes(how):
    items = _items()
    items[17] = (items[17][0][:, :24, :24].clone(), items[17][1])
    with pytest.raises(ValueError, match=r"dataset: item 17's image is \(3, 24, 24\) but item \d+'s is \(3, 32, 32\)"):
        _fit(items, runtime=how)


@pytest.mark.parametrize("how", LOADERS)
def test_a_different_channel_count_is_named(how):
    items = _items()
    items[30] = (items[30][0][:1].clone(), items[30][1])
    with pytest.raises(ValueError, match=r"dataset: item 30's image has 1 channels but item 0's has 3"):
        _fit(items, runtime=how)


def test_a_float_label_deep_in_the_dataset_is_named():
    items = _items()
    items[9] = (items[9][0], 1.0)
    with pytest.raises(TypeError, match=r"dataset: labels must be integer class ids, item 9's is a float"):
        _fit(items)


def test_the_checked_collate_stacks_as_the_default_one():
    from torch.utils.data import default_collate

    items = _items(4)
    images, labels = _CheckedCollate((3, 32, 32))(list(enumerate(items)))
    expected = default_collate(items)
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1]) and labels.dtype == torch.long


def test_a_bad_item_found_in_a_loader_worker_keeps_its_message():
    items = _items()
    items[21] = (items[21][0], items[21][1], "extra")
    with pytest.raises(TypeError, match=r"item 21 is a tuple of 3"):
        _fit(items, runtime={"num_workers": 1})


def test_batches_of_another_size_than_item_0_are_named():
    # item 0 at 32 px, all others at 24 px: every batch without item 0 agrees with itself
    items = _items()
    items = [items[0]] + [(image[:, :24, :24].clone(), label) for image, label in items[1:]]
    with pytest.raises(ValueError, match=r"dataset: item \d+'s image is \(3, 24, 24\) but item 0's is \(3, 32, 32\)"):
        _fit(items)
    # a batch reader whose batches all come out at 24 px while its item 0 is 32 px
    reader = BatchReader(_items(), spoil=lambda rows, images, labels: (images[..., :24, :24].contiguous(), labels))
    with pytest.raises(ValueError, match=r"item 0's image is \(3, 32, 32\)"):
        _fit(reader)


def test_dataset_labels_are_read_where_a_dataset_holds_them():
    labels = torch.tensor([2, 0, 2, 1])
    tensors = TensorDataset(torch.zeros(4, 3, 8, 8), labels)
    assert torch.equal(dataset_labels(tensors), labels)
    assert torch.equal(dataset_labels(Subset(tensors, [3, 0])), torch.tensor([1, 2]))
    assert torch.equal(dataset_labels(PlantedPatterns(6)), PlantedPatterns(6).labels)
    assert dataset_labels([(torch.zeros(3, 8, 8), 0)]) is None
    assert dataset_labels(TensorDataset(torch.zeros(4, 3, 8, 8), labels.float())) is None  # not class ids


def test_each_epochs_batches_are_fixed_by_seed_and_epoch():
    batches = epoch_batches(20, 8, seed=1, epoch=0)
    assert [len(b) for b in batches] == [8, 8]  # the last partial batch is dropped
    assert len(set(sum(batches, []))) == 16 and all(0 <= i < 20 for b in batches for i in b)
    assert batches == epoch_batches(20, 8, seed=1, epoch=0)
    assert batches != epoch_batches(20, 8, seed=1, epoch=1) and batches != epoch_batches(20, 8, seed=2, epoch=0)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    epoch_batches(20, 8, seed=1, epoch=0)
    assert torch.equal(state, torch.get_rng_state())  # the training's random draws are not shifted


def test_the_three_ways_to_read_batches_agree():
    data = PlantedPatterns(16, patch=12)
    rows = epoch_batches(16, 4, seed=0, epoch=0)
    ways = [BatchSource(data, CPU, 4), BatchSource(data, CPU, 4, preloaded=True), BatchSource(BatchReader(_items(16)), CPU, 4)]
    read = [list(way.batches(rows, seed=0)) for way in ways]
    for batches in read[1:]:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(read[0], batches))
    assert [b[1].tolist() for b in read[0]] == [data.labels[r].tolist() for r in rows]
    assert read[0][0][1].dtype == torch.long


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


def test_decoded_random_crops_are_crops_and_repeat_under_a_seed():
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
    _fit(data, classifier=tiny_cnn(), steps=3)
    assert calls == [8, 8, 8]


def _ramps(n=32, size=16):
    """Each image a left-to-right ramp, another per image: a flip reverses it, a crop shortens it."""
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    return (ramp * torch.arange(1, n + 1).view(n, 1, 1, 1)).expand(n, 3, size, size).contiguous()


def test_square_crops_are_crops_and_repeat_under_a_seed():
    images = _ramps()
    torch.manual_seed(1)
    a = square_crops(images, (0.25, 0.5), (12, 12))
    torch.manual_seed(1)
    assert torch.equal(a, square_crops(images, (0.25, 0.5), (12, 12)))
    assert a.shape == (32, 3, 12, 12)
    rows, whole = a[:, 0, 6], images[:, 0, 8]
    assert (rows[:, 1:] >= rows[:, :-1] - 1e-5).all()  # still increasing: not flipped, not mixed
    span = (rows[:, -1] - rows[:, 0]) / (whole[:, -1] - whole[:, 0])
    # a square of a quarter to a half of the area spans a half to 0.71 of the width (less a border pixel)
    assert (span > 0.35).all() and (span < 0.75).all()
    # each crop lies within its own image's values
    assert ((a.amin((1, 2, 3)) >= images.amin((1, 2, 3)) - 1e-5) & (a.amax((1, 2, 3)) <= images.amax((1, 2, 3)) + 1e-5)).all()
    full = square_crops(images, (1.0, 1.0), (16, 16))
    assert torch.allclose(full, images, atol=1e-5)  # the whole image, resized to its own size


def test_sample_resolution_crops_and_flips():
    images = _ramps()
    none = Sampling(flip=False)
    assert torch.equal(sample(images, none, 1.0), images)
    half = sample(images, none, 0.5)
    assert half.shape == (32, 3, 8, 8)
    assert torch.allclose(half, F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False, antialias=True))
    assert sample(images, Sampling(flip=False, crop_scale=(0.5, 0.9)), 0.75).shape == (32, 3, 12, 12)
    torch.manual_seed(0)
    flipped = sample(images, Sampling(flip=True), 1.0)
    is_flipped = (flipped == images.flip(-1)).flatten(1).all(1)
    kept = (flipped == images).flatten(1).all(1)
    assert (is_flipped ^ kept).all()  # each image whole, flipped or not
    assert 4 < int(is_flipped.sum()) < 28
    torch.manual_seed(0)
    assert torch.equal(sample(images, Sampling(flip=True), 1.0), flipped)


def test_images_per_pass():
    assert images_per_pass(32, 224, 224, 16 * 224 * 224) == 16
    assert images_per_pass(32, 112, 112, 16 * 224 * 224) == 32
    assert images_per_pass(8, 32, 32, None) == 8
    assert images_per_pass(8, 32, 32, 3 * 32 * 32 + 5) == 3
    assert images_per_pass(8, 32, 32, 10) == 1  # at least one


def test_a_batch_split_into_passes_trains(caplog):
    sizes = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = PatternClassifier(patch=12)

        def forward(self, x):
            sizes.append(len(x))
            return self.inner(x)

    with caplog.at_level(logging.INFO, logger="blackbox_saliency.training"):
        explainer = _fit(PlantedPatterns(16, patch=12), classifier=Spy(), runtime={"max_pixels_per_pass": 3 * 32 * 32})
    assert "in 3 passes of up to 3 (runtime.max_pixels_per_pass)" in caplog.text
    assert explainer.config.training["steps"] == 4
    assert all(torch.isfinite(p).all() for p in explainer.parameters())
    # the classifier sees a pass at a time: up to 3 images, twice over for the preserve and destroy terms
    assert max(sizes[1:]) <= 6
    sizes.clear()
    _fit(PlantedPatterns(16, patch=12), classifier=Spy())
    assert max(sizes[1:]) > 6  # unsplit: the whole batch at once
