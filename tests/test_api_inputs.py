"""explain's inputs as pytorch-grad-cam and Captum users bring them: classifiers returning
containers (Hugging Face models, dicts, tuples), no class ids (explain the top prediction),
and PIL images or file paths with a timm classifier."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

import blackbox_saliency.api as api
from blackbox_saliency import Explainer, explain, top_classes

from conftest import SMALL, ConstantLogits


class ChannelMeans(torch.nn.Module):
    """Known answer: the logit of class c is the mean of channel c, so the top class is the
    brightest channel. Differentiable; records every call (batch size, grad mode, train mode)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []
        self.inputs = []

    def forward(self, x):
        self.calls.append((x.shape[0], torch.is_grad_enabled(), self.training))
        self.inputs.append(x.detach().clone())
        return self.scale * x.mean(dim=(2, 3))


class ModelOutput(OrderedDict):
    """Like transformers' ModelOutput: a dict whose entries are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Wrapped(torch.nn.Module):
    """The same classifier, its logits returned inside a container."""

    def __init__(self, inner, wrap):
        super().__init__()
        self.inner, self.wrap = inner, wrap

    def forward(self, x):
        return self.wrap(self.inner(x))


def channel_images(brightest):
    """One image per entry, channel ``brightest[i]`` the brightest."""
    x = torch.rand(len(brightest), 3, 16, 16) * 0.1
    for i, c in enumerate(brightest):
        x[i, c] += 1.0
    return x


@pytest.fixture
def explainer3():
    return Explainer(num_classes=3, **SMALL).eval()


# --- 1. outputs that are not a tensor ---------------------------------------------------------

WRAPS = {
    "huggingface": lambda z: ModelOutput(loss=None, logits=z, hidden_states=(z[:, :1],)),
    "dict": lambda z: {"logits": z, "features": z.detach()},
    "tuple": lambda z: (z, torch.zeros(z.shape[0], 8, 2, 2)),
    "list": lambda z: [z],
}


@pytest.mark.parametrize("kind", sorted(WRAPS))
def test_common_containers_are_unwrapped(kind, explainer3):
    x, ids = channel_images([0, 1, 2, 1]), [0, 1, 2, 0]
    plain, wrapped = ChannelMeans(), Wrapped(ChannelMeans(), WRAPS[kind])
    assert torch.equal(explain(wrapped, x, ids, explainer=explainer3), explain(plain, x, ids, explainer=explainer3))
    torch.manual_seed(1)
    a = explain(plain, x[:2], ids[:2], method="optimize", steps=3)
    torch.manual_seed(1)
    b = explain(wrapped, x[:2], ids[:2], method="optimize", steps=3)
    assert torch.allclose(a, b)
    assert top_classes(wrapped, x).flatten().tolist() == [0, 1, 2, 1]


def test_output_adapter_picks_the_logits(explainer3):
    x = channel_images([2, 0])
    clf = Wrapped(ChannelMeans(), lambda z: {"scores": z, "probabilities": z.softmax(1)})
    masks = explain(clf, x, [2, 0], explainer=explainer3, output=lambda out: out["scores"])
    assert torch.equal(masks, explain(ChannelMeans(), x, [2, 0], explainer=explainer3))
    assert top_classes(clf, x, output=lambda out: out["scores"]).flatten().tolist() == [2, 0]
    # the adapter wins over automatic unwrapping
    clf = Wrapped(ChannelMeans(), lambda z: (z, -z))
    assert top_classes(clf, x, output=lambda out: out[1]).flatten().tolist() == [1, 1]


def test_the_optimisation_still_freezes_a_wrapped_classifier():
    clf = Wrapped(ChannelMeans(), WRAPS["huggingface"]).train()
    explain(clf, channel_images([0]), 0, method="optimize", steps=2)
    assert clf.training and clf.inner.scale.grad is None and clf.inner.scale.requires_grad
    assert all(not training for _, _, training in clf.inner.calls)


@pytest.mark.parametrize(
    "wrap,kwargs,error,match",
    [
        (lambda z: {"scores": z}, {}, TypeError,
         r"classifier: returned a dict with keys \['scores'\].*explain\(\.\.\., output=lambda out: out\['scores'\]\)"),
        (lambda z: (torch.zeros(z.shape[0], 8, 2, 2), z), {}, TypeError,
         r"its first element has shape \(1, 8, 2, 2\), not \(N, K\).*output=lambda out: out\[1\]"),
        (lambda z: "cat", {}, TypeError, r"classifier: returned a str, not a tensor of logits.*output=lambda out: \.\.\."),
        (lambda z: {"scores": z}, {"output": lambda out: out["logits"]}, TypeError,
         r"output: failed on the classifier's output, a dict with keys \['scores'\] \(KeyError"),
        (lambda z: {"scores": z}, {"output": lambda out: out["scores"].tolist()}, TypeError,
         r"output: must return a tensor of logits \(N, K\), returned a list"),
        (lambda z: z, {"output": "logits"}, TypeError, "output: expected a callable"),
        (lambda z: {"logits": z[:, :1]}, {}, ValueError, "classifier: must return at least 2 class logits"),
    ],
)
@pytest.mark.parametrize("method", ["optimize", "explainer", "top_classes"])
def test_outputs_that_cannot_be_unwrapped_say_how(wrap, kwargs, error, match, method, explainer3):
    clf, x = Wrapped(ChannelMeans(), wrap), channel_images([0])
    with pytest.raises(error, match=match):
        if method == "top_classes":
            top_classes(clf, x, **kwargs)
        elif method == "explainer":
            explain(clf, x, 0, explainer=explainer3, **kwargs)
        else:
            explain(clf, x, 0, method="optimize", steps=1, **kwargs)


# --- 2. class_ids=None and top_classes ----------------------------------------------------------

def test_no_class_ids_explains_the_top_prediction(explainer3):
    brightest = [2, 0, 1, 1, 0]
    x, clf = channel_images(brightest), ChannelMeans().train()
    masks = explain(clf, x, explainer=explainer3, batch_size=2)
    assert masks.shape == (5, 1, 16, 16)
    assert torch.equal(masks, explain(clf, x, brightest, explainer=explainer3, batch_size=2))
    assert not torch.equal(masks, explain(clf, x, [1, 2, 0, 0, 2], explainer=explainer3, batch_size=2))
    # the top classes: one pass in no_grad and eval mode, chunk by chunk; the mode restored
    assert clf.calls[1:4] == [(2, False, False), (2, False, False), (1, False, False)]
    assert clf.training


def test_no_class_ids_with_the_optimisation(monkeypatch):
    seen = []
    monkeypatch.setattr(api, "optimize_masks", lambda clf, images, ids, **kw: seen.append(ids) or torch.ones(len(ids), 1, 16, 16))
    masks = explain(ChannelMeans(), channel_images([1, 2, 0]), method="optimize", batch_size=2)
    assert masks.shape == (3, 1, 16, 16) and torch.cat(seen).tolist() == [1, 2, 0]


def test_top_classes_known_answer():
    clf = ConstantLogits([0.0, 3.0, 1.0, 2.0])
    ids = top_classes(clf, torch.randn(3, 3, 8, 8), k=3, batch_size=2)
    assert ids.dtype == torch.long and ids.device.type == "cpu"
    assert ids.tolist() == [[1, 3, 2]] * 3
    assert top_classes(clf, torch.randn(2, 3, 8, 8)).tolist() == [[1], [1]]


def test_explaining_the_top_k_as_documented(explainer3):
    x, clf = channel_images([0, 2]), ChannelMeans()
    ids = top_classes(clf, x, k=2)
    masks = torch.cat([explain(clf, x, ids[:, j], explainer=explainer3) for j in range(2)], dim=1)
    assert masks.shape == (2, 2, 16, 16)
    assert torch.equal(masks[:, :1], explain(clf, x, explainer=explainer3))


@pytest.mark.parametrize("k", [0, 4, 1.5, True])
def test_top_classes_bad_k(k):
    with pytest.raises(ValueError, match="k: expected an int from 1 to the classifier's 3 classes"):
        top_classes(ChannelMeans(), channel_images([0]), k=k)


# --- 3. PIL images and file paths with a timm classifier ----------------------------------------

CFG = {"input_size": (3, 24, 24), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 0.75,
       "interpolation": "bilinear", "crop_mode": "center"}


class TimmLike(ChannelMeans):
    pretrained_cfg = CFG


def stripes():
    """48 x 32 pixels: red, green, blue vertical thirds of 16 columns each."""
    array = np.zeros((32, 48, 3), dtype=np.uint8)
    for c in range(3):
        array[:, 16 * c : 16 * (c + 1), c] = 255
    return Image.fromarray(array)


def test_pil_images_are_preprocessed_with_the_pretrained_cfg():
    clf = TimmLike()
    masks = explain(clf, stripes(), method="optimize", steps=1)
    assert masks.shape == (1, 1, 24, 24)  # the model's input size
    seen = clf.inputs[0][0]
    # short side 32 = 24 / crop_pct: no resize; the centre 24 columns are 12-35: red 4, green 16, blue 4
    expected = torch.full((3, 24, 24), -2.0)
    expected[0, :, :4] = expected[1, :, 4:20] = expected[2, :, 20:] = 2.0
    assert torch.allclose(seen, expected, atol=1e-5)
    assert top_classes(clf, [stripes()]).tolist() == [[1]]  # green covers most of the crop


def test_file_paths_and_pil_images_give_the_masks_of_the_tensor(tmp_path, explainer3):
    path = tmp_path / "stripes.png"
    stripes().save(path)
    clf = TimmLike()
    masks = explain(clf, [path, str(path), stripes()], explainer=explainer3)
    tensor = clf.inputs[0][:1].expand(3, -1, -1, -1)
    assert masks.shape == (3, 1, 24, 24)
    assert torch.equal(masks, explain(clf, tensor, [1, 1, 1], explainer=explainer3))


def test_a_real_timm_model_without_downloading():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    masks = explain(model, [image], 2, method="optimize", steps=1)
    assert masks.shape == (1, 1, *model.pretrained_cfg["input_size"][1:])
    assert top_classes(model, image, k=2).shape == (1, 2)


def test_pictures_need_a_classifier_with_a_pretrained_cfg(tmp_path):
    with pytest.raises(TypeError, match="images: PIL images and file paths need a timm classifier.*ChannelMeans has none"):
        explain(ChannelMeans(), [stripes()], 0)
    with pytest.raises(FileNotFoundError, match="images: no such file"):
        explain(TimmLike(), [tmp_path / "missing.png"], 0)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="images: cannot read .*notes.txt.* as an image"):
        explain(TimmLike(), str(tmp_path / "notes.txt"), 0)
    with pytest.raises(ValueError, match="images: the batch is empty"):
        explain(TimmLike(), [], 0)
    with pytest.raises(TypeError, match="images: expected a torch.Tensor"):
        explain(TimmLike(), [stripes(), 3], 0)


# --- inputs checked once per call ---------------------------------------------------------------

def test_explain_scans_images_and_checks_class_ids_once_however_many_chunks(explainer3, monkeypatch):
    import blackbox_saliency._validation as validation
    import blackbox_saliency.explainer as explainer_module

    scans, id_checks = [], []
    real_finite, real_ids = validation._all_finite, validation.check_class_ids
    monkeypatch.setattr(validation, "_all_finite", lambda t, *a, **k: scans.append(t.shape[0]) or real_finite(t, *a, **k))
    counting = lambda *a, **k: id_checks.append(1) or real_ids(*a, **k)  # noqa: E731
    monkeypatch.setattr(api, "check_class_ids", counting)
    monkeypatch.setattr(explainer_module, "check_class_ids", counting)
    images, ids = torch.randn(10, 3, 16, 16), [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    masks = explain(ConstantLogits([0.0, 1.0, 2.0]), images, ids, explainer=explainer3, batch_size=3)
    assert masks.shape == (10, 1, 16, 16)
    assert scans == [10]  # the whole batch once, not again per chunk of 3
    assert len(id_checks) == 1
    # the same masks as the explainer called directly, with its own checks
    assert torch.allclose(masks, explainer3(images, ids), atol=1e-6)
