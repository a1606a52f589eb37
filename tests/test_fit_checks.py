"""fit_explainer checks every item it reads, not only the first (issue #13): a bad item deep in
the dataset is named when its batch is assembled, in each of the three ways batches are read
(a DataLoader, ``preload=True``, a dataset's own ``batch(indices)``)."""

import pytest
import torch
from torch.utils.data import TensorDataset

from blackbox_saliency import fit_explainer
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

from conftest import SMALL


def _fit(data, **kwargs):
    kwargs = {**SMALL, "epochs": 1, "batch_size": 8, "progress": False, "device": "cpu", "embedding_steps": 0, **kwargs}
    return fit_explainer(PatternClassifier(patch=12), data, **kwargs)


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


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("index", [0, 21])
def test_an_item_that_is_not_a_pair_is_named(how, index):
    items = _items()
    image, label = items[index]
    items[index] = (image, label, "extra")
    with pytest.raises(TypeError, match=rf"dataset: .*\(image, label\) pairs.*item {index} is a tuple of 3"):
        _fit(items, **how)


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
        _fit(items, **how)


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
    data = BatchReader(items) if how.pop("reader", False) else items
    where = "read by preload" if how else "batch 4 of epoch 1"  # seed 3 puts item 25 in the last batch
    with pytest.raises(ValueError, match=rf"dataset: NaN or infinite values in item 25 \({where}\): bad data") as caught:
        _fit(data, checkpoint_dir=tmp_path, checkpoint_every=1, seed=3, **how)
    assert "lr" not in str(caught.value)
    checkpoint = tmp_path / "last.pt"
    if how:  # preload reads every item before training: nothing was trained or saved
        assert not checkpoint.exists()
        return
    # the three steps before the bad batch were checkpointed, and never with weights it touched
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_every_bad_item_of_the_batch_is_listed():
    items = _spoilt(at=range(32))  # every item: the first batch read has 8 bad ones
    with pytest.raises(ValueError, match=r"dataset: NaN or infinite values in items (\d+, ){7}\d+ \(batch 1 of epoch 1\)"):
        _fit(items)


def test_huge_but_finite_images_are_accepted():
    # their sum overflows float32; only a non-finite sum triggers the closer look, which passes
    from blackbox_saliency.training import _check_values

    images = torch.full((16, 3, 32, 32), 3e38)
    _check_values(images, torch.zeros(16, dtype=torch.long), list(range(16)), 4, "batch 1 of epoch 1")
    images[5, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"item 5 \(batch 1 of epoch 1\)"):
        _check_values(images, torch.zeros(16, dtype=torch.long), list(range(16)), 4, "batch 1 of epoch 1")


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
        _fit(items, **how)


def test_a_batch_reader_returning_uint8_images_reports_the_dtype():
    data = BatchReader(_items(), spoil=lambda rows, images, labels: ((images * 255).to(torch.uint8), labels))
    with pytest.raises(TypeError, match=r"dataset: batch\(indices\).*torch\.uint8.*convert .*float"):
        _fit(data)


@pytest.mark.parametrize("how", LOADERS)
def test_mixed_image_sizes_name_both_sizes(how):
    items = _items()
    items[17] = (items[17][0][:, :24, :24].clone(), items[17][1])
    with pytest.raises(ValueError, match=r"dataset: item 17's image is \(3, 24, 24\) but item \d+'s is \(3, 32, 32\)"):
        _fit(items, **how)


@pytest.mark.parametrize("how", LOADERS)
def test_a_different_channel_count_is_named(how):
    items = _items()
    items[30] = (items[30][0][:1].clone(), items[30][1])
    with pytest.raises(ValueError, match=r"dataset: item 30's image has 1 channels but item 0's has 3"):
        _fit(items, **how)


def test_a_float_label_deep_in_the_dataset_is_named():
    items = _items()
    items[9] = (items[9][0], 1.0)
    with pytest.raises(TypeError, match=r"dataset: labels must be integer class ids, item 9's is a float"):
        _fit(items)


def test_the_checked_collate_stacks_as_the_default_one():
    from torch.utils.data import default_collate

    from blackbox_saliency.training import _CheckedCollate

    items = _items(4)
    images, labels = _CheckedCollate((3, 32, 32))(list(enumerate(items)))
    expected = default_collate(items)
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1]) and labels.dtype == torch.long


def test_a_bad_item_found_in_a_loader_worker_keeps_its_message():
    items = _items()
    items[21] = (items[21][0], items[21][1], "extra")
    with pytest.raises(TypeError, match=r"item 21 is a tuple of 3"):
        _fit(items, num_workers=1)



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
