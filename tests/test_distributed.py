"""Training on several processes: ``fit_explainer`` under ``torchrun`` (two CPU processes with
gloo) trains what one process trains, and the pieces that make it so."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from blackbox_saliency import fit_explainer, get_recipe
from blackbox_saliency._distributed import BatchShard, _AllReduceBatchNorm2d, sync_batchnorm, unsync_batchnorm
from blackbox_saliency.testing import PatternClassifier, PlantedPatterns

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fit_with_torchrun.py"
# float64, so one and two processes must agree to ~1e-11: any slip in sharding, random draws,
# statistics or gradient averaging shows up as a difference of order one. The matched filter pools
# smoothly: its maximum's gradient jumps when rounding moves the maximum, and one process on 1 and on
# 2 threads then diverges as much as one and two processes do (2026-12-06, docs/distributed.md).
# One embedding-stage step, then mask steps, with the small recipe (the removed peak too).
SMALL = ["--train-images", "256", "--batch-size", "64", "--float64", "--smooth-pool", "50", "--embedding-steps", "1"]


def _fit(tmp_path: Path, name: str, processes: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([*launcher, str(EXAMPLE), *SMALL, "--out", str(tmp_path / name), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _worst_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-6)).item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    out = _fit(tmp, "one", 1, "--steps", "4").stdout
    assert "1 process(es)" in out
    return _weights(tmp / "one")


@pytest.fixture(scope="module")
def without_removed_peak(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    _fit(tmp, "plain", 1, "--steps", "2", "--embedding-steps", "2", "--removed-peak-weight", "0")
    return _weights(tmp / "plain")


def test_two_processes_train_the_removed_peak_as_one_does(tmp_path, without_removed_peak):
    # the removed peak's second encoder pass runs inside the DistributedDataParallel forward
    args = ["--steps", "2", "--embedding-steps", "2", "--removed-peak-weight", "1"]
    _fit(tmp_path, "one", 1, *args)
    _fit(tmp_path, "two", 2, *args)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    embedding = "masking_model.feature_filter.embedding.weight"
    assert not torch.equal(one[embedding], without_removed_peak[embedding])
    assert _worst_difference(one, two) < 1e-9


def test_two_processes_train_what_one_trains(tmp_path, one_process):
    # logging every step: its loss reduction runs on every process (process 0 alone would hang)
    done = _fit(tmp_path, "two", 2, "--steps", "4", "--log-every", "1")
    assert done.stdout.count("2 process(es)") == 1  # process 0 alone reports and saves
    assert [done.stderr.count(f"step {i}/4: ") for i in (1, 2, 3, 4)] == [1, 1, 1, 1], done.stderr[-2000:]
    two = _weights(tmp_path / "two")
    assert _worst_difference(one_process, two) < 1e-9
    # and the comparison can fail: one more step is a different explainer
    _fit(tmp_path, "five", 1, "--steps", "5")
    assert _worst_difference(one_process, _weights(tmp_path / "five")) > 1e-4


def test_a_run_started_on_two_processes_resumes_on_one(tmp_path, one_process):
    # a longer run resumes a shorter one of the same recipe, whose stages keep the steps they had:
    # 0.3 of 2 steps is one embedding step, as 0.25 of 4 is in the one-process run
    stages = ('schedule.stages=[{"kind": "embedding", "share": 0.3, "removed_peak_weight": 1.0}, '
              '{"kind": "masks", "share": 0.7, "filter": "presence_only"}]')
    checkpoints = tmp_path / "checkpoints"
    _fit(tmp_path, "half", 2, "--steps", "2", "--set", stages, "--checkpoint-dir", str(checkpoints))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"]
    done = _fit(tmp_path, "resumed", 1, "--steps", "4", "--set", stages, "--checkpoint-dir", str(checkpoints))
    assert "resumed from" in done.stderr and "(step 2)" in done.stderr  # not trained afresh to the same weights
    assert _worst_difference(one_process, _weights(tmp_path / "resumed")) < 1e-9


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path):
    done = _fit(tmp_path, "odd", 2, "--steps", "1", "--batch-size", "63", check=False)
    assert done.returncode != 0
    assert "schedule.batch_size: 63 must divide among 2 process(es)" in done.stderr


def test_shards_draw_the_rows_of_the_whole_batch():
    for draw in (lambda s, n: s.rand(n, 2), lambda s, n: s.randn(n, 3, 2, 2), lambda s, n: s.randint(1, 9, n)):
        torch.manual_seed(3)
        expected = draw(BatchShard(), 6)
        parts = []
        for rank in range(3):
            torch.manual_seed(3)  # every process's generator starts alike
            parts.append(draw(BatchShard(rank, 3), 2))
        assert torch.equal(torch.cat(parts), expected)
        assert not torch.equal(parts[0], parts[1])
    # one process: exactly plain torch.rand
    torch.manual_seed(5)
    a = BatchShard().rand(4)
    torch.manual_seed(5)
    assert torch.equal(a, torch.rand(4))


def test_sync_batchnorm_swaps_trainable_norms_and_back_keeping_the_weights():
    frozen = nn.BatchNorm2d(3).requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(frozen))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[1], _AllReduceBatchNorm2d) and model[1].weight is weight
    assert model[2][0] is frozen  # a frozen encoder's norms stay as they are
    unsync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_preloaded_data_trains_what_streamed_data_trains():
    torch.set_num_threads(2)
    data = PlantedPatterns(96, patch=12, seed=0)
    recipe = get_recipe("small").replace(**{"model.encoder_kwargs": {"widths": [8, 16, 16]}, "schedule.batch_size": 32,
                                            "runtime.precision": "fp32"})
    runs = [fit_explainer(PatternClassifier(patch=12), data, recipe.replace(**{"runtime.preload": preload}), epochs=2,
                          seed=0, progress=False)
            for preload in (False, True)]
    streamed, preloaded = (r.state_dict() for r in runs)
    assert all(torch.equal(streamed[k], preloaded[k]) for k in streamed)


class _Huge(torch.utils.data.Dataset):
    """A billion images that are never read: only the first, to learn their size."""

    def __len__(self):
        return 10**9

    def __getitem__(self, index):
        return torch.zeros(3, 32, 32), 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_preload_on_gpu_trains_and_refuses_what_does_not_fit():
    data = PlantedPatterns(96, patch=12, seed=0)
    recipe = get_recipe("small").replace(**{"model.encoder_kwargs": {"widths": [8, 16, 16]}, "schedule.batch_size": 32,
                                            "runtime.preload": True})
    explainer = fit_explainer(PatternClassifier(patch=12), data, recipe, epochs=2, device="cuda", progress=False)
    assert explainer.device.type == "cuda"
    with pytest.raises(ValueError, match="preload: the dataset takes"):
        fit_explainer(PatternClassifier(patch=12), _Huge(), recipe, device="cuda", progress=False)


def test_the_smooth_pool_stays_within_its_bound_of_the_maximum_and_spreads_the_gradient():
    data = PlantedPatterns(8, patch=12, seed=0)
    hard, soft = PatternClassifier(patch=12), PatternClassifier(patch=12, smooth=50.0)
    positions = (32 - 12 + 1) ** 2
    excess = soft(data.images) - hard(data.images)
    assert (excess >= 0).all() and (excess <= hard.scale * math.log(positions) / 50.0 + 1e-5).all()
    assert torch.equal(soft(data.images).argmax(1), data.labels)  # still names the pattern
    # the maximum's gradient sits on one position per class; the smooth pool's on many
    counts = []
    for model in (hard, soft):
        images = data.images[:1].clone().requires_grad_(True)
        model(images)[0, data.labels[0]].backward()
        counts.append(int((images.grad.abs().sum(1) > 1e-6).sum()))
    assert counts[0] == 12 * 12 and counts[1] > counts[0]


@pytest.mark.parametrize("smooth", [0, -1.0, True, "50"])
def test_a_bad_smooth_pool_is_refused_naming_it(smooth):
    with pytest.raises(ValueError, match="smooth"):
        PatternClassifier(smooth=smooth)
