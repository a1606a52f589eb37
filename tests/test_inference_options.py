"""Inference options give masks within stated tolerances of float32 (docs/speed.md)."""

import copy

import pytest
import torch

from blackbox_saliency import Explainer

from conftest import SMALL


@pytest.fixture
def explainer():
    torch.manual_seed(0)
    model = Explainer(num_classes=4, **SMALL)
    model.train()(torch.randn(16, 3, 32, 32), 0)  # one batch in train mode: realistic BatchNorm statistics
    return model.eval()


def _max_diff(reference, configured, images, ids):
    with torch.no_grad():
        return (reference(images, ids) - configured(images, ids)).abs().max().item()


def test_channels_last_matches_float32(explainer):
    images, ids = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    fast = copy.deepcopy(explainer).for_inference(channels_last=True)
    assert _max_diff(explainer, fast, images, ids) < 1e-5


def test_bfloat16_is_within_tolerance_and_returns_float32(explainer):
    images, ids = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    fast = copy.deepcopy(explainer).for_inference(dtype=torch.bfloat16)
    with torch.no_grad():
        assert fast(images, ids).dtype == torch.float32
    assert _max_diff(explainer, fast, images, ids) < 0.05


def test_bad_dtype(explainer):
    with pytest.raises(ValueError, match="dtype"):
        explainer.for_inference(dtype=torch.int8)


def test_bad_compile_mode(explainer):
    with pytest.raises(ValueError, match="compile: expected True, False or one of"):
        explainer.for_inference(compile="fastest")


@pytest.mark.slow
def test_compiled_matches_float32(explainer):
    images, ids = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    fast = copy.deepcopy(explainer).for_inference(compile=True)
    assert _max_diff(explainer, fast, images, ids) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu(explainer, dtype):
    images, ids = torch.randn(8, 3, 32, 32, device="cuda"), torch.arange(8, device="cuda") % 4
    reference = copy.deepcopy(explainer).cuda()
    fast = copy.deepcopy(explainer).cuda().for_inference(dtype=dtype, channels_last=True)
    assert _max_diff(reference, fast, images, ids) < 0.05
