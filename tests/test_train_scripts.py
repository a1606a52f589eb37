"""The training scripts' data splits (hub/): pure functions, no training."""

import importlib.util
import json
from pathlib import Path

import pytest
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


class _RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, commit_message):
        self.calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"

        return Commit()


def test_push_publishes_the_cifar10_classifier_too(tmp_path, monkeypatch, capsys):
    import shutil

    from blackbox_saliency.hub import WEIGHTS_FOLDER

    push = _script("push")
    shutil.copytree(WEIGHTS_FOLDER / "classifier-cifar10", tmp_path / "classifier-cifar10")
    push.main(["--owner", "someone", "--dry-run"], weights=tmp_path)
    assert "classifier-cifar10: ok, would push to someone/classifier-cifar10" in capsys.readouterr().out
    _RecordingApi.calls = []
    monkeypatch.setattr(push, "HfApi", _RecordingApi)
    push.main(["--owner", "someone", "--private"], weights=tmp_path)
    assert _RecordingApi.calls[0] == ("create", "someone/classifier-cifar10", True, True)
    assert _RecordingApi.calls[1][:2] == ("upload", "someone/classifier-cifar10")
    assert {"config.json", "model.safetensors", "README.md"} <= set(_RecordingApi.calls[1][2])


def test_push_checks_a_classifier_folder_before_pushing_anything(tmp_path, monkeypatch):
    import shutil

    import pytest

    from blackbox_saliency.hub import WEIGHTS_FOLDER

    push = _script("push")
    shutil.copytree(WEIGHTS_FOLDER / "classifier-cifar10", tmp_path / "classifier-cifar10")
    (tmp_path / "classifier-cifar10" / "config.json").write_text('{"architecture": "Other"}')
    _RecordingApi.calls = []
    monkeypatch.setattr(push, "HfApi", _RecordingApi)
    with pytest.raises(ValueError, match="unexpected architecture"):
        push.main(["--owner", "someone"], weights=tmp_path)
    assert _RecordingApi.calls == []


def test_cifar10_heldout_scores_count_empty_masks_and_presence_hits():
    script = _script("train_cifar10")
    labels = torch.tensor([0, 1, 2, 3])
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)

    class Stub(torch.nn.Module):
        """Masks empty for the first two images, full for the others; presence right for image 0 only."""

        def __init__(self):
            super().__init__()
            self.masking_model = self
            self.calls = 0

        def forward(self, x, class_ids):
            masks = torch.ones(len(x), 1, 32, 32)
            masks[:2] = 0.2
            return masks

        def presence(self, x):
            logits = torch.zeros(len(x), 10)
            logits[0, 0] = 1.0
            logits[1:, 9] = 1.0  # image 3's label is 3, not 9
            return logits

    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    scores = script.evaluate_explainer(Stub(), classifier, images, labels, "cpu")
    assert scores["empty_true"] == 0.5
    assert scores["presence_top1"] == 0.25
    assert abs(scores["area_true"] - 0.6) < 1e-6


def test_cifar10_mask_agreement_by_hand():
    a = torch.zeros(3, 1, 2, 2)
    b = torch.zeros(3, 1, 2, 2)
    a[0, 0, 0] = 1.0  # image 0: a has 2 pixels on, b 1 of them: IoU 1/2
    b[0, 0, 0, 0] = 1.0
    a[1, 0, 1, 1] = 0.9  # image 1: only a has a pixel on: IoU 0
    b[1, 0, 1, 1] = 0.4  # (below the threshold; differs by 0.5)
    agreement = _script("train_cifar10").mask_agreement(a, b)  # image 2: both empty, left out
    assert abs(agreement["iou_above_half"] - 0.25) < 1e-6
    assert abs(agreement["images_either_non_empty"] - 2 / 3) < 1e-6
    assert abs(agreement["mean_abs_difference"] - 1.5 / 12) < 1e-6


def test_cifar10_explainer_and_score_stages_run_end_to_end(tmp_path):
    import shutil
    import subprocess
    import sys

    import pytest

    from conftest import SHARED_DATA

    pack = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not pack.exists():
        pytest.skip("shared CIFAR-10 pack not found")
    shutil.copytree(ROOT / "blackbox_saliency" / "weights" / "classifier-cifar10", tmp_path / "classifier-cifar10")
    script = [sys.executable, str(ROOT / "hub" / "train_cifar10.py")]
    common = ["--pack", str(pack), "--out", str(tmp_path), "--limit", "1000"]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*script, "explainer", *common, "--max-steps", "2", "--checkpoints", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "explainer-cifar10"
    assert (folder / "model.safetensors").exists()
    training = json.loads((folder / "config.json").read_text())["training"]
    assert training["recipe"] == "cifar" and training["overrides"] == {} and training["steps"] == 2
    done = subprocess.run([*script, "score", *common, "--explainer", str(folder), "--explainer", str(folder)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out (100 images)" in done.stdout and '"presence_top1"' in done.stdout
    agreement = json.loads(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])  # the folder against itself
    assert agreement["mean_abs_difference"] == 0.0
    done = subprocess.run([*script, "score", *common], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "--explainer: score needs at least one" in done.stderr


def test_lite0_script_is_one_timm_recipe_call_and_records_it(tmp_path):
    import subprocess
    import sys

    from conftest import tiny_imagenet_pack

    wnids = ["n01443537", "n01629819"]  # goldfish, European fire salamander
    train = tiny_imagenet_pack(tmp_path / "train.tar.gz", "train", wnids, 4)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    script = [sys.executable, str(ROOT / "hub" / "train_lite0.py"), "--imagenette", "none", "--tiny", str(train),
              "--cache", str(tmp_path / "cache"), "--threads", "1", "--checkpoints", str(tmp_path / "runs")]
    done = subprocess.run([*script, "--steps", "2", "--set", "schedule.batch_size=4", "--set", "runtime.precision=\"fp32\"",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    training = json.loads((tmp_path / "out" / "explainer-efficientnet_lite0" / "config.json").read_text())["training"]
    assert training["recipe"] == "timm" and training["steps"] == 2
    assert training["overrides"] == {"schedule.batch_size": 4, "runtime.precision": "fp32"}
    assert "--imagenette none" in training["command"]
    bad = subprocess.run([*script[:2], "--imagenette", "none", "--checkpoints", "x", "--out", "y"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "--imagenette none: give --tiny packs" in bad.stderr


def test_centre_presence_script_measures_on_the_pack_and_keeps_the_weights(tmp_path):
    import subprocess
    import sys

    from torchvision import transforms

    from blackbox_saliency import Explainer
    from blackbox_saliency.datasets import TinyImageNet
    from conftest import SMALL, tiny_imagenet_pack

    pack = tiny_imagenet_pack(tmp_path / "train.tar.gz", "train", ["n01443537", "n01629819"], 3)
    info = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    explainer = Explainer(num_classes=200, **SMALL, classifier_info=info).eval()
    explainer.save_pretrained(tmp_path / "in" / "explainer-x")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    command = [sys.executable, str(ROOT / "hub" / "centre_presence.py"), "--explainer", str(tmp_path / "in" / "explainer-x"),
               "--pack", str(pack), "--cache", str(tmp_path / "cache"), "--images", "5", "--size", "32"]
    done = subprocess.run(command + ["--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    tf = transforms.Compose([transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize(info["mean"], info["std"])])
    data = TinyImageNet(pack, split="train", transform=tf, cache_dir=tmp_path / "cache")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:5].tolist()
    with torch.no_grad():
        expected = explainer.masking_model.presence(torch.stack([data[i][0] for i in order])).mean().item()
    centred = Explainer.from_pretrained(tmp_path / "out" / "explainer-x")
    assert abs(centred.config.presence_reference - expected) < 1e-5
    assert centred.config.training["presence_centring"]["reference"] == centred.config.presence_reference
    assert all(torch.equal(v, explainer.state_dict()[k]) for k, v in centred.state_dict().items())
    for out, message in ((tmp_path / "in", "--out: would overwrite"), (tmp_path / "again", "already centred")):
        source = tmp_path / "out" / "explainer-x" if message == "already centred" else tmp_path / "in" / "explainer-x"
        bad = subprocess.run(command[:3] + [str(source)] + command[4:] + ["--out", str(out)],
                             capture_output=True, text=True, timeout=300, env=env)
        assert bad.returncode != 0 and message in bad.stderr
