import pytest
import timm
import torch

from blackbox_saliency import Explainer
from blackbox_saliency.encoders import SmallEncoder, build_encoder
from blackbox_saliency.masking_model import MaskingModel

from conftest import SMALL


def test_small_encoder_pyramid():
    enc = SmallEncoder(widths=(8, 16, 32), layers_per_block=5)
    assert enc.feature_info.reduction() == [2, 4, 8]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in enc.modules()) == 15  # 3 blocks of 5 convs


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("efficientnet_lite0", 64), ("resnet18", 50)])
def test_timm_encoders_give_masks_at_input_size(name, size):
    explainer = Explainer(num_classes=5, encoder=name, pretrained_encoder=False).eval()
    out = explainer.masks_with_details(torch.randn(2, 3, size, size + 6), torch.tensor([0, 4]))
    assert out.mask.shape == (2, 1, size, size + 6)
    assert out.low_res_mask.shape[-1] * 4 >= size + 6  # a quarter of the (padded) input
    assert 0 <= out.mask.min() and out.mask.max() <= 1


def test_decoder_widths_follow_the_encoder():
    model = MaskingModel(build_encoder("resnet50"), num_classes=10, num_bottlenecks=1)
    # the paper's 768 / 384 / 192 on ResNet-50
    assert [u.mix[0].out_channels for u in model.upsamplers] == [768, 384, 192]


def test_gradients_reach_decoder_and_embedding_not_frozen_encoder():
    explainer = Explainer(num_classes=4, encoder="resnet18", pretrained_encoder=False, freeze_encoder=True).train()
    out = explainer.masks_with_details(torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    (out.mask.mean() + out.presence_logit.mean()).backward()
    mm = explainer.masking_model
    assert mm.feature_filter.embedding.weight.grad is not None
    assert mm.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in mm.encoder.parameters())
    assert not mm.encoder.training  # a frozen encoder keeps its BatchNorm statistics


def test_batched_equals_per_sample():
    explainer = Explainer(num_classes=4, **SMALL).eval()
    x, ids = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    batched = explainer(x, ids)
    single = torch.cat([explainer(x[i : i + 1], ids[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-6)


def test_class_selector_changes_the_mask():
    explainer = Explainer(num_classes=4, **SMALL).train()  # batch statistics: untrained eval BN shrinks features
    x = torch.randn(4, 3, 32, 32)
    assert (explainer(x, 0) - explainer(x, 1)).abs().max() > 1e-3


def test_encoder_errors():
    with pytest.raises(ValueError, match="encoder"):
        build_encoder("no_such_model_xyz")
    with pytest.raises(TypeError, match="feature"):
        build_encoder(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="num_classes"):
        Explainer(num_classes=1, **SMALL)
