"""Interrupted training, failed saves, odd classifiers, and property-based checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blackbox_saliency.explainer as explainer_module
from blackbox_saliency import Explainer, explain, fit_explainer, get_recipe
from blackbox_saliency.metrics import localisation_error, saliency_metric, tightest_box
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

from conftest import SMALL, ConstantLogits

ROOT = Path(__file__).resolve().parents[1]
# 6 epochs of 4 steps, a checkpoint every 3 steps (and at each epoch's end), so that most land mid-epoch
CHANGES = {"model.encoder_kwargs": SMALL["encoder_kwargs"], "schedule.batch_size": 8, "schedule.epochs": 6,
           "runtime.checkpoint_every": 3, "runtime.precision": "fp32"}
FIT = dict(seed=5, device="cpu", progress=False)
TOTAL_STEPS = 6 * 4
# the subprocess's classifier is the same function, slowed down (0.1 s a call, about one call a
# step), so that the kill lands mid-run however fast the machine is; the runs here are not slowed
TRAIN_SCRIPT = """
import json, sys, time, torch
from blackbox_saliency import fit_explainer, get_recipe
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns
torch.set_num_threads({threads})  # as in the parent: CPU reductions depend on the thread count


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.classifier = PatternClassifier(patch=12)

    def forward(self, x):
        time.sleep(0.1)
        return self.classifier(x)


recipe = get_recipe("small").replace(**json.loads(sys.argv[2]))
fit_explainer(Slow(), PlantedPatterns(32, patch=12), recipe, checkpoint_dir=sys.argv[1], **{fit})
"""


def recipe():
    return get_recipe("small").replace(**CHANGES)


def test_sigkill_mid_epoch_then_resume_loses_at_most_one_interval(tmp_path):
    script = TRAIN_SCRIPT.format(fit=repr(FIT), threads=torch.get_num_threads())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), json.dumps(CHANGES)], env=env)
    checkpoint = tmp_path / "last.pt"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not checkpoint.exists():
            time.sleep(0.05)
        time.sleep(0.3)  # let it run on into the middle of some later step
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kill must have landed while training ran, or this test would check no resume at all
    assert proc.returncode == -signal.SIGKILL, f"the training subprocess ended by itself ({proc.returncode})"
    assert checkpoint.exists(), "the training subprocess never wrote a checkpoint"
    saved_step = int(torch.load(checkpoint, weights_only=True)["step"])
    # only at checkpoint intervals and epoch ends
    assert 0 < saved_step < TOTAL_STEPS and (saved_step % 3 == 0 or saved_step % 4 == 0), saved_step
    resumed = fit_explainer(PatternClassifier(patch=12), PlantedPatterns(32, patch=12), recipe(), checkpoint_dir=tmp_path,
                            resume=True, **FIT)
    assert resumed.config.training["steps"] == TOTAL_STEPS
    uninterrupted = fit_explainer(PatternClassifier(patch=12), PlantedPatterns(32, patch=12), recipe(), **FIT)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.allclose(tensor.float(), resumed.state_dict()[name].float(), atol=1e-5), name


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    fit_explainer(PatternClassifier(patch=12), PlantedPatterns(32, patch=12), recipe(), checkpoint_dir=tmp_path,
                  epochs=1, **FIT)
    before = (tmp_path / "last.pt").read_bytes()

    def dying_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        fit_explainer(PatternClassifier(patch=12), PlantedPatterns(32, patch=12), recipe(), checkpoint_dir=tmp_path,
                      resume=True, epochs=2, **FIT)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != "last.pt"]


def test_truncated_checkpoint_is_refused(tmp_path):
    fit_explainer(PatternClassifier(patch=12), PlantedPatterns(32, patch=12), recipe(), checkpoint_dir=tmp_path, epochs=1,
                  **FIT)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="corrupted"):
        fit_explainer(PatternClassifier(patch=12), PlantedPatterns(32, patch=12), recipe(), checkpoint_dir=tmp_path,
                      resume=True, epochs=2, **FIT)


def test_non_differentiable_classifier_is_refused():
    def argmax_classifier(x):
        return torch.nn.functional.one_hot(x.mean(dim=(2, 3)).argmax(1), 3).float()

    with pytest.raises(TypeError, match="differentiabl"):
        explain(argmax_classifier, torch.randn(2, 3, 16, 16), 0, method="optimize", steps=1)
    with pytest.raises(TypeError, match="differentiabl"):
        fit_explainer(argmax_classifier, PlantedPatterns(16, patch=12), recipe(), steps=1, progress=False)


def test_classifier_that_cannot_take_the_images():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(ValueError, match=r"classifier: failed on an input of shape \(1, 3, 32, 32\)"):
        explain(model, torch.randn(2, 3, 32, 32), 0, method="optimize", steps=1)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        explain(model, torch.randn(2, 3, 16, 16, dtype=torch.float64), 0, method="optimize", steps=1)


# ---- property-based ---------------------------------------------------------------------------

masks_strategy = st.tuples(st.integers(1, 4), st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(masks_strategy, st.floats(0.0, 0.99))
def test_tightest_box_contains_every_pixel_above_threshold(shape, threshold):
    n, h, w, seed = shape
    masks = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed)) ** 3
    boxes = tightest_box(masks, threshold)
    assert boxes.shape == (n, 4)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.tolist()):
        assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
        outside = mask[0].clone()
        outside[y0 : y1 + 1, x0 : x1 + 1] = 0
        assert not (outside > threshold).any()


@settings(max_examples=25, deadline=None)
@given(masks_strategy)
def test_metrics_are_bounded_and_finite(shape):
    n, h, w, seed = shape
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 1, h, w, generator=g)
    gt = [torch.tensor([[0, 0, w - 1, h - 1]])] * n
    error = localisation_error(masks, gt)
    assert 0.0 <= error <= 1.0
    s = saliency_metric(ConstantLogits([0.0, 1.0]), torch.randn(n, 3, h, w, generator=g), masks, torch.zeros(n, dtype=torch.long))
    assert s.shape == (n,) and torch.isfinite(s).all()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(8, 40), st.integers(8, 40), st.sampled_from([torch.float32, torch.float64, torch.float16]),
       st.integers(0, 3))
def test_explainer_masks_for_any_shape_and_float_dtype(n, h, w, dtype, cls):
    torch.manual_seed(0)
    explainer = Explainer(num_classes=4, **SMALL).eval()
    images = torch.randn(n, 3, h, w).to(dtype)
    masks = explainer(images, cls)
    assert masks.shape == (n, 1, h, w) and masks.dtype == torch.float32
    assert torch.isfinite(masks).all() and 0 <= masks.min() and masks.max() <= 1


def test_finite_check_survives_overflowing_sums_and_finds_nan_anywhere():
    from blackbox_saliency._validation import _all_finite

    big = torch.full((3, 3, 8, 8), 3e38)  # finite, but its sum overflows float32
    assert _all_finite(big)
    assert _all_finite(torch.full((16,), 60000.0, dtype=torch.float16))
    for position in (0, 100, 191):
        x = torch.randn(3, 64)
        x.view(-1)[position] = float("nan")
        assert not _all_finite(x)
    assert not _all_finite(torch.tensor([1.0, float("inf")]))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(8, 40), st.sampled_from([torch.float32, torch.float64, torch.float16]))
def test_explain_checks_dtype_against_the_classifier(n, size, dtype):
    from conftest import tiny_cnn

    torch.manual_seed(0)
    explainer = Explainer(num_classes=4, **SMALL).eval()
    images = torch.randn(n, 3, size, size).to(dtype)
    if dtype == torch.float32:
        masks = explain(tiny_cnn(4), images, list(range(n)), explainer=explainer)
        assert masks.shape == (n, 1, size, size) and 0 <= masks.min() and masks.max() <= 1
    else:  # a float32 classifier cannot take these: a clear error, not a crash inside torch
        with pytest.raises(ValueError, match=f"classifier: failed on an input .* dtype {dtype}"):
            explain(tiny_cnn(4), images, 0, explainer=explainer)


def test_metrics_name_bad_arguments():
    masks = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="gt_boxes: entry 1"):
        localisation_error(masks, [torch.tensor([[0, 0, 3, 3]]), torch.tensor([1, 2, 3])])
    with pytest.raises(ValueError, match="masks: expected shape"):
        saliency_metric(ConstantLogits([0.0, 1.0]), torch.randn(2, 3, 16, 16), masks, [0, 1])
    with pytest.raises(TypeError, match="images"):
        saliency_metric(ConstantLogits([0.0, 1.0]), "not images", masks, [0, 1])
    with pytest.raises(ValueError, match="class_ids"):
        saliency_metric(ConstantLogits([0.0, 1.0]), torch.randn(2, 3, 8, 8), masks, [0])
