"""Examples that run offline in seconds are run here, so they cannot rot unseen."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_video_example_writes_an_animated_overlay(tmp_path):
    out = _run("explain_video.py", "--out", str(tmp_path / "video.gif"))
    assert "frames per second" in out
    with Image.open(tmp_path / "video.gif") as gif:
        assert gif.n_frames == 48


def test_pull_example_falls_back_to_the_local_copy_offline(tmp_path):
    out = _run("pull_pretrained.py", "--out", str(tmp_path))
    assert "using the local copy" in out and "localisation error on 16 new images" in out
    assert len(list(tmp_path.glob("planted*.png"))) == 4


def _mini_imagenette(root: Path, samples: list[Path]) -> Path:
    """An Imagenette-shaped folder: one class per photograph, training photographs and two "held-out"
    ImageNet validation photographs with wsolevaluation-style boxes and sizes."""
    index = {row.split("\t")[1]: int(row.split("\t")[0])
             for row in (SHARED_DATA / "imagenet1k-classes.tsv").read_text().splitlines() if row}
    meta = root / "metadata" / "ILSVRC" / "test"
    meta.mkdir(parents=True)
    boxes, sizes, labels = [], [], []
    for i, sample in enumerate(samples):
        wnid = sample.name.split("_")[0]
        held = i % 4 == 0
        name = f"ILSVRC2012_val_{i:08d}.JPEG" if held else sample.name
        folder = root / ("val" if i % 3 == 0 else "train") / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        with Image.open(sample) as image:
            image = image.convert("RGB")
            w, h = image.size
            image.save(folder / name)
            for copy in range(5):  # enough photographs for the recipe's batch of 32
                image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "train" / wnid / f"{sample.stem}_{copy}.JPEG")
        if held:
            boxes.append(f"val/{name},{w // 4},{h // 4},{3 * w // 4},{3 * h // 4}")
            sizes.append(f"val/{name},{w},{h}")
            labels.append(f"val/{name},{index[wnid]}")
    for file, rows in (("localization.txt", boxes), ("image_sizes.txt", sizes), ("class_labels.txt", labels)):
        (meta / file).write_text("\n".join(rows) + "\n")
    return root


def test_fit_example_trains_scores_and_saves_the_explainer(tmp_path):
    pack = SHARED_DATA / "imagenet-samples.tar.gz"
    if not pack.exists():
        pytest.skip("shared ImageNet samples not found")
    with tarfile.open(pack) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".JPEG")]
        tar.extractall(tmp_path / "samples", members=members[:8])  # eight classes, one photograph each
    root = _mini_imagenette(tmp_path / "imagenette", sorted((tmp_path / "samples").rglob("*.JPEG")))
    out = _run("fit_custom_classifier.py", "--imagenette", str(root), "--steps", "2", "--out", str(tmp_path / "explainer"))
    assert "recipe 'timm'" in out and "| Grad-CAM |" in out and "| this explainer |" in out
    saved = json.loads((tmp_path / "explainer" / "config.json").read_text())
    assert saved["evaluation"]["results"][0]["method"] == "this explainer"
