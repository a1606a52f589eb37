"""How a run uses the machine: precision per part, the classifier's own precision, layout,
checkpoints, devices and the running losses (bf16 only in forward passes or a step or two: it is
emulated, and slow, on CPUs without native bf16)."""

import json
import os

import pytest
import torch

from blackbox_saliency import Explainer, fit_explainer
from blackbox_saliency._distributed import LOCAL
from blackbox_saliency._precision import PartPrecision, with_precision
from blackbox_saliency.evidence import gaussian_blur
from blackbox_saliency.recipes import get_recipe
from blackbox_saliency.testing import PlantedPatterns
from blackbox_saliency.training import fit as fit_module
from blackbox_saliency.training.runtime import (Meter, check_writable, load_checkpoint, placed, resolve_device, restore,
                                                save_checkpoint, use_bf16)

from conftest import SMALL, tiny_cnn

CPU = torch.device("cpu")


def recipe(**changes):
    # the contiguous layout: channels-last (the CPU's default, covered in test_training_fit) is slower to start
    return get_recipe("small").replace(**{"model.encoder_kwargs": SMALL["encoder_kwargs"], "runtime.precision": "fp32",
                                          "runtime.channels_last": False, "schedule.batch_size": 8, **changes})


def fit(with_recipe, classifier=None, **kwargs):
    kwargs = {"steps": 2, "progress": False, "device": "cpu", **kwargs}
    return fit_explainer(tiny_cnn() if classifier is None else classifier, PlantedPatterns(16, patch=12), with_recipe,
                         **kwargs)


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
                                         CPU, channels_last=False, default=True, embedding_stage=len(times) == 6)
        assert (parts.masking_model, parts.classifier, parts.embedding_stage) == expected
        assert PartPrecision.from_dict(parts.to_dict()) == parts
        assert next(script, None) is None  # every pass timed, none twice


def test_timing_the_parts_leaves_no_trace():
    from blackbox_saliency import _precision

    torch.manual_seed(0)
    explainer, classifier = Explainer(4, **SMALL).train(), tiny_cnn()
    before = {k: v.clone() for k, v in explainer.state_dict().items()}
    rng = torch.get_rng_state()
    _precision.measure_parts(classifier, explainer.masking_model, torch.Size([3, 16, 16]), 2, 4, CPU,
                             channels_last=True, repeats=1)
    assert torch.equal(rng, torch.get_rng_state())  # training's random draws are not shifted
    assert all(torch.equal(before[k], v) for k, v in explainer.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in explainer.parameters())


def test_part_precision_labels_and_old_records():
    assert PartPrecision(True, True, True).label == "bf16" and PartPrecision(False, False, False).label == "fp32"
    assert PartPrecision(True, False, True).label == "mixed"
    # a record written before the embedding stage was timed on its own follows the masking model
    assert PartPrecision.from_dict({"masking_model": "bf16", "classifier": "fp32"}) == PartPrecision(True, False, True)


def test_a_classifier_under_its_own_precision_inside_autocast():
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert with_precision(layer, False, "cpu")(x).dtype == torch.float32
        assert with_precision(layer, False, "cpu")(x.bfloat16()).dtype == torch.float32
    assert with_precision(layer, True, "cpu")(x).dtype == torch.bfloat16
    double = torch.nn.Linear(4, 3).double()
    assert with_precision(double, False, "cpu")(x.double()).dtype == torch.float64  # never cast down


def test_use_bf16():
    assert use_bf16("bf16", CPU) and not use_bf16("fp32", CPU) and not use_bf16("fp32", torch.device("cuda"))
    assert use_bf16("auto", torch.device("cuda"))  # on CUDA bf16 autocast always pays
    assert not use_bf16("auto", torch.device("meta"))
    assert isinstance(use_bf16("auto", CPU), bool)


def test_an_auto_run_records_its_parts_and_a_resumed_run_keeps_them(tmp_path, monkeypatch):
    # bf16 for the embedding stage only, which a 2-step run of the small recipe does not reach:
    # the parts are recorded and kept without a bf16 step
    timed = []

    def measured(*args, **kwargs):
        timed.append((args[2], kwargs["embedding_stage"]))
        return PartPrecision(False, False, True)

    monkeypatch.setattr(fit_module, "use_bf16", lambda precision, device: precision != "fp32")  # any CPU
    monkeypatch.setattr(fit_module, "measure_parts", measured)
    auto = recipe(**{"runtime.precision": "auto", "runtime.checkpoint_every": 1})
    first = fit(auto, checkpoint_dir=tmp_path)
    assert timed == [(torch.Size([3, 32, 32]), True)]  # at the last stage's resolution, with the embedding stage
    assert first.config.training["stage_ends"] == [0, 2]
    parts = {"masking_model": "fp32", "classifier": "fp32", "embedding_stage": "bf16"}
    assert first.config.training["precision"] == "mixed" and first.config.training["precision_parts"] == parts

    def not_again(*args, **kwargs):
        raise AssertionError("a resumed run timed the parts again")

    monkeypatch.setattr(fit_module, "measure_parts", not_again)
    resumed = fit(auto, steps=4, checkpoint_dir=tmp_path, resume=True)
    assert resumed.config.training["steps"] == 4
    assert resumed.config.training["precision_parts"] == parts


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_and_bf16_steps_run_and_restore_the_classifier_layout(monkeypatch, precision):
    # one mask step each (the small recipe's embedding stage rounds to 0 steps of 1)
    monkeypatch.setattr(fit_module, "measure_parts", lambda *a, **k: pytest.fail("precision was given: nothing to time"))
    classifier = tiny_cnn()
    seen = []
    classifier.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    explainer = fit(recipe(**{"runtime.precision": precision, "runtime.channels_last": True}), classifier, steps=1)
    training = explainer.config.training
    assert training["precision"] == precision and training["steps"] == 1 and training["channels_last"] is True
    assert set(training["precision_parts"].values()) == {precision}
    assert any(seen) == (precision == "bf16")  # the classifier ran under autocast only in bf16
    assert classifier[0].weight.is_contiguous()
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in explainer.parameters())
    masks = explainer(PlantedPatterns(2, patch=12).images, 0)
    assert torch.isfinite(masks).all()


def test_blur_in_bf16_and_channels_last_matches_float32():
    x = torch.randn(2, 3, 40, 40)
    reference = gaussian_blur(x, 3.0)
    fast = gaussian_blur(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), 3.0)
    assert fast.dtype == torch.bfloat16 and (fast.float() - reference).abs().max() < 0.05


def test_placed_moves_the_classifier_for_the_run_and_back():
    classifier = tiny_cnn()
    with placed(classifier, CPU, channels_last=True):
        assert classifier[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not classifier[0].weight.is_contiguous()
    assert classifier[0].weight.is_contiguous()
    function = lambda x: x  # noqa: E731  a plain function passes through
    with placed(function, CPU, channels_last=True):
        pass


def test_meter_reads_losses_keeps_running_averages_and_stops_on_nan():
    meter = Meter(LOCAL, every=3)
    meter.add({"loss": torch.tensor(1.0), "area": torch.tensor(0.5)})
    meter.add({"loss": torch.tensor(2.0), "area": torch.tensor(0.5), "preserve": torch.tensor(float("nan"))})
    assert meter.running == {}  # read only every 3 steps
    meter.flush()
    assert meter.running["loss"] == pytest.approx(0.95 * 1.0 + 0.05 * 2.0) and meter.running["area"] == 0.5
    assert "preserve" not in meter.running  # a non-finite term other than the loss is skipped
    assert meter.steps_read == 2 and meter.summary().startswith("loss=1.05")
    # a term the next stage no longer has leaves the log
    meter.add({"loss": torch.tensor(1.0), "embed": torch.tensor(0.3)})
    meter.flush()
    assert set(meter.running) == {"loss", "embed"}
    meter.add({"loss": torch.tensor(1.0)})
    meter.add({"loss": torch.tensor(1.0)})
    with pytest.raises(FloatingPointError, match=r"the loss became nan at step 6; the last good checkpoint is kept"):
        meter.add({"loss": torch.tensor(float("nan"))})  # the third pending step: read now
    resumed = Meter(LOCAL)
    resumed.steps_read = 40  # a resumed run counts from its step
    resumed.add({"loss": torch.tensor(float("inf"))})
    with pytest.raises(FloatingPointError, match="became inf at step 41"):
        resumed.flush()


def _explainer_and_optimizer(seed=0, **kwargs):
    torch.manual_seed(seed)
    explainer = Explainer(4, **{**SMALL, **kwargs})
    optimizer = torch.optim.Adam(explainer.parameters(), lr=1e-3)
    explainer.masking_model.head(torch.randn(2, explainer.masking_model.head.in_channels, 2, 2)).sum().backward()
    optimizer.step()
    return explainer, optimizer


def test_a_checkpoint_restores_weights_optimiser_position_and_random_draws(tmp_path):
    settings = {"recipe": {"schedule": {"lr": 0.001}}, "seed": 3}
    explainer, optimizer = _explainer_and_optimizer()
    path = tmp_path / "last.pt"
    torch.manual_seed(7)
    save_checkpoint(path, explainer, optimizer, settings, (2, 1, 9), [3, 12], CPU)
    next_draw = torch.rand(3)
    assert os.listdir(tmp_path) == ["last.pt"]  # written atomically: nothing left beside it
    state = load_checkpoint(path, CPU)
    assert (state["epoch"], state["batch"], state["step"], state["stage_ends"]) == (2, 1, 9, [3, 12])
    fresh, fresh_optimizer = _explainer_and_optimizer(seed=1)
    torch.manual_seed(99)
    assert restore(state, path, fresh, fresh_optimizer, settings, CPU) == (2, 1, 9)
    assert torch.equal(torch.rand(3), next_draw)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in explainer.state_dict().items())
    assert json.dumps(fresh_optimizer.state_dict()["param_groups"]) == json.dumps(optimizer.state_dict()["param_groups"])
    with pytest.raises(ValueError, match="another recipe or seed"):
        restore(state, path, fresh, fresh_optimizer, {**settings, "seed": 4}, CPU)
    other, other_optimizer = _explainer_and_optimizer(mask_reduction=2)
    with pytest.raises(ValueError, match="another architecture"):
        restore(state, path, other, other_optimizer, settings, CPU)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(RuntimeError, match="unreadable or corrupted .*resume=False"):
        load_checkpoint(path, CPU)


def test_devices_and_checkpoint_folders_are_checked(tmp_path):
    assert resolve_device(None) is None and resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match="device: not a device: 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda")
    check_writable(tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir() and os.listdir(tmp_path / "new" / "folder") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="checkpoint_dir: .* is not writable"):
        check_writable(tmp_path / "file" / "sub")
