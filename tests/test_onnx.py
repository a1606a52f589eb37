import pytest
import torch

from blackbox_saliency import Explainer

from conftest import SMALL

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


# gate_encoder: the perturbation below makes its two encoders differ, so both must be exported
@pytest.mark.parametrize("options", [{}, {"presence_reference": 0.3}, {"presence_std_threshold": 1.0},
                                     {"gate_encoder": True}])
def test_onnx_export_matches_pytorch(tmp_path, options):
    torch.manual_seed(0)
    explainer = Explainer(num_classes=4, **SMALL, classifier_info={"input_size": [3, 32, 32]}, **options).eval()
    with torch.no_grad():  # weights away from their init, so every class scores differently
        for p in explainer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = explainer.export_onnx(tmp_path / "explainer.onnx")
    session = ort.InferenceSession(str(path))
    images, ids = torch.randn(5, 3, 32, 32), torch.tensor([0, 3, 1, 2, 2])  # another batch size than exported
    (masks,) = session.run(None, {"images": images.numpy(), "class_ids": ids.numpy()})
    with torch.no_grad():
        expected = explainer(images, ids)
    assert masks.shape == (5, 1, 32, 32)
    assert abs(torch.from_numpy(masks) - expected).max() < 1e-4


def test_onnx_export_needs_a_size(tmp_path):
    with pytest.raises(ValueError, match="input_size"):
        Explainer(num_classes=4, **SMALL).export_onnx(tmp_path / "x.onnx")
