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


def test_a_gate_encoder_decides_the_gate_and_the_other_encoder_the_features():
    torch.manual_seed(0)
    model = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=4, gate_encoder=True).eval()
    x, ids = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    gate = model.gate_encoder(x)[-1]
    out = model(x, ids, class_logits=True)
    # the gate and the class scores read the gate's copy ...
    expected = torch.einsum("nchw,nc->nhw", gate, model.feature_filter.embeddings(ids)).flatten(1).amax(1)
    assert torch.allclose(out.presence_logit, expected, atol=1e-5)
    assert torch.allclose(out.class_logits, model.presence(x), atol=1e-5)
    # ... so changing the decoder's encoder changes the mask but not the scores
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.mul_(1.5)
    moved = model(x, ids, class_logits=True)
    assert torch.allclose(moved.presence_logit, out.presence_logit) and not torch.allclose(moved.mask, out.mask)


def test_a_gate_encoder_needs_a_trainable_encoder_and_survives_saving(tmp_path):
    with pytest.raises(ValueError, match="gate_encoder"):
        MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=4, gate_encoder=True, freeze_encoder=True)
    with pytest.raises(TypeError, match="gate_encoder"):
        MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=4, gate_encoder="yes")
    explainer = Explainer(num_classes=4, gate_encoder=True, **SMALL).eval()
    with torch.no_grad():
        for p in explainer.masking_model.gate_encoder.parameters():
            p.add_(0.1)
    explainer.save_pretrained(tmp_path)
    loaded = Explainer.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    assert loaded.config.gate_encoder is True
    assert torch.equal(loaded(x, 1), explainer(x, 1))
    assert Explainer(num_classes=4, **SMALL).masking_model.gate_encoder is None  # the paper's: one encoder


def test_detach_gate_keeps_the_mask_losses_from_the_class_filter_and_its_encoder():
    torch.manual_seed(0)
    model = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=4, gate_encoder=True).train()
    assert not hasattr(model, "detach_gate") and not hasattr(model, "detach_bottleneck")  # a forward argument now
    x, ids = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])

    def gradients(detach_gate):
        model.zero_grad(set_to_none=True)
        out = model(x, ids, detach_gate=detach_gate)
        out.mask.mean().backward()
        reached = lambda module: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())  # noqa: E731
        return {name: reached(part) for name, part in (("filter", model.feature_filter), ("gate", model.gate_encoder),
                                                        ("encoder", model.encoder), ("decoder", model.upsamplers))}

    assert gradients(False) == {"filter": True, "gate": True, "encoder": True, "decoder": True}
    assert gradients(True) == {"filter": False, "gate": False, "encoder": True, "decoder": True}
    # the per-image score still passes its gradient to the filter, and the masks are the same
    with torch.no_grad():
        assert torch.equal(model(x, ids, detach_gate=True).mask, model(x, ids).mask)
    model.zero_grad(set_to_none=True)
    model(x, ids, detach_gate=True).presence_logit.sum().backward()
    assert model.feature_filter.embedding.weight.grad.abs().sum() > 0


def test_gate_features_are_the_gate_encoders_coarsest_map():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    shared = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=4).eval()
    with torch.no_grad():
        assert torch.equal(shared.gate_features(x), shared.encoder(x)[-1])
        separate = MaskingModel(SmallEncoder(widths=(8, 16, 32)), num_classes=4, gate_encoder=True).eval()
        for p in separate.gate_encoder.parameters():
            p.add_(0.1)
        assert torch.equal(separate.gate_features(x), separate.gate_encoder(x)[-1])
        assert not torch.equal(separate.gate_features(x), separate.encoder(x)[-1])
