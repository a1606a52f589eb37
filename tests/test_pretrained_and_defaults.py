"""Issue #13: shipped weights inside the package, the shared explainer cache, map_location, one
default encoder that works offline, a direct call at the wrong size, export in eval mode."""

import inspect
import socket
import warnings

import huggingface_hub
import pytest
import timm
import torch

import blackbox_saliency.hub as hub
from blackbox_saliency import Explainer, explain, fit_explainer
from blackbox_saliency.encoders import DEFAULT_ENCODER, build_encoder, classifier_features

from conftest import SMALL, tiny_cnn


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    explainer = Explainer(num_classes=4, **SMALL, classifier_info={"name": "tiny_cnn", "input_size": [3, 32, 32]}).eval()
    explainer.save_pretrained(tmp_path / "saved")
    hub.clear_cache()
    yield explainer, tmp_path / "saved"
    hub.clear_cache()


def test_from_pretrained_moves_the_model_to_map_location(saved):
    _, folder = saved
    loaded = Explainer.from_pretrained(folder, map_location="meta")  # a device every machine has
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
    with pytest.raises(ValueError, match="map_location"):
        Explainer.from_pretrained(folder, map_location="no-such-device")


def test_shared_explainer_is_per_device_and_user_copies_are_their_own(saved):
    _, folder = saved
    cpu = hub.shared_explainer(folder, device="cpu")
    assert hub.shared_explainer(folder, device="cpu") is cpu
    meta = hub.shared_explainer(folder, device="meta")
    assert meta is not cpu and meta.device.type == "meta" and cpu.device.type == "cpu"
    mine = hub.load_explainer(folder)
    mine.to(torch.float64)  # changing one's own copy changes nobody else's
    assert next(cpu.parameters()).dtype == torch.float32 and mine is not cpu
    with pytest.raises(ValueError, match="device: not a device"):
        hub.shared_explainer(folder, device="no-such-device")


def test_a_failed_load_is_retried_later_not_never(saved, monkeypatch):
    explainer, folder = saved
    classifier = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    (folder.parent / "explainer-resnet18").symlink_to(folder)
    monkeypatch.setattr(hub, "WEIGHTS_FOLDER", folder.parent)
    monkeypatch.setitem(hub.KNOWN_EXPLAINERS, "resnet18", {"repo_id": "x/y", "folder": "explainer-resnet18"})
    calls = []
    real = hub.load_explainer

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("the Hub timed out")
        return real(*args, **kwargs)

    monkeypatch.setattr(hub, "load_explainer", flaky)
    assert hub.known_explainer_for(classifier, (3, 32, 32), "cpu") is None
    assert hub.known_explainer_for(classifier, (3, 32, 32), "cpu") is None  # not asked again at once
    assert len(calls) == 1
    monkeypatch.setattr(hub, "RETRY_AFTER_SECONDS", 0.0)
    found = hub.known_explainer_for(classifier, (3, 32, 32), "cpu")
    assert found is not None and len(calls) == 2
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(explain(classifier, x, [1, 2]), explainer(x, [1, 2]))


def test_the_shipped_explainer_is_inside_the_package():
    import importlib.resources

    package = importlib.resources.files("blackbox_saliency")
    folder = hub.WEIGHTS_FOLDER / "explainer-efficientnet_lite0"
    assert str(folder).startswith(str(package))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    lite0 = timm.create_model("efficientnet_lite0", pretrained=False)
    assert hub.pretrained_for(lite0) == str(folder)


def test_one_default_encoder_everywhere_and_it_works_offline():
    from blackbox_saliency.cli import _build_parser
    from blackbox_saliency.recipes import ModelSettings, resolve_recipe

    assert inspect.signature(Explainer).parameters["encoder"].default == DEFAULT_ENCODER
    # fit_explainer and the command line default to the "auto" recipe, which for a classifier that
    # is not timm's picks the small recipe, on the default encoder
    assert inspect.signature(fit_explainer).parameters["recipe"].default == "auto"
    assert _build_parser().parse_args(["fit", "data", "--out", "x"]).recipe == "auto"
    assert resolve_recipe("auto", tiny_cnn(3)).model.encoder == DEFAULT_ENCODER == ModelSettings().encoder
    Explainer(num_classes=3)  # builds with no download


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def no_download(*args, **kwargs):
        raise AssertionError("timm was asked to download weights")

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: no_download() if k.get("pretrained") else _create(*a, **k))


_create = timm.create_model


def test_missing_pretrained_weights_fail_at_once_with_the_fix_offline(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE.*pretrained_encoder=False") as error:
        build_encoder("resnet18", pretrained=True)
    assert "--no-pretrained-encoder" not in str(error.value)  # a command-line flag that is gone


def test_missing_pretrained_weights_fail_at_once_when_the_hub_is_unreachable(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(RuntimeError, match="cannot be reached.*pretrained_encoder=False"):
        build_encoder("resnet18", pretrained=True)


def test_classifier_features_carry_the_classifiers_weights():
    torch.manual_seed(0)
    classifier = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    encoder = classifier_features(classifier).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(x)[-1], classifier.forward_features(x), atol=1e-6)
    explainer = Explainer(num_classes=5, encoder=encoder, num_bottlenecks=1)
    assert explainer.config.encoder == "resnet18" and explainer.config.freeze_encoder
    with pytest.raises(TypeError, match="classifier: expected a timm model"):
        classifier_features(tiny_cnn(4))


def test_a_direct_call_at_another_size_warns_once(saved):
    explainer, _ = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer(torch.randn(1, 3, 32, 32), 0)  # its own size: silent
    with pytest.warns(UserWarning, match=r"trained for inputs of shape \(3, 32, 32\), got \(3, 64, 64\)"):
        explainer(torch.randn(1, 3, 64, 64), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer(torch.randn(1, 3, 64, 64), 0)  # once per explainer


def test_onnx_export_does_not_warn_about_training_mode(saved, tmp_path):
    pytest.importorskip("onnxscript")
    explainer, _ = saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explainer.export_onnx(tmp_path / "e.onnx")
    assert not [w for w in caught if "training mode" in str(w.message)]
