"""The training scripts' data splits (hub/): pure functions, no training."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "hub" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar10_heldout_split_holds_out_every_class_from_class_sorted_data():
    # the pack is read sorted by class: a "last 10%" split would hold out a single class
    labels = torch.arange(10).repeat_interleave(50)
    train, heldout = _script("train_cifar10").heldout_split(labels, per_class=5)
    assert torch.bincount(labels[heldout], minlength=10).tolist() == [5] * 10
    assert torch.bincount(labels[train], minlength=10).tolist() == [45] * 10
    assert set(train.tolist()).isdisjoint(heldout.tolist())
    assert len(train) + len(heldout) == len(labels)


def test_cifar10_heldout_split_is_fixed():
    labels = torch.arange(10).repeat_interleave(20)
    script = _script("train_cifar10")
    first, second = script.heldout_split(labels, 3), script.heldout_split(labels, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cifar10_limit_keeps_every_class():
    labels = torch.arange(10).repeat_interleave(100)
    images = torch.arange(len(labels))
    kept_images, kept_labels = _script("train_cifar10").subset(images, labels, 200)
    assert len(kept_labels) == 200 and len(kept_labels.unique()) == 10
    assert torch.equal(labels[kept_images], kept_labels)
