"""show_mask_on_image: the mask as a heatmap over the image, from whatever the user holds."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from blackbox_saliency.visualize import COLORMAPS, denormalize, show_mask_on_image


def test_known_pixels_with_jet():
    # jet(1) = (0.5, 0, 0) and jet(0) = (0, 0, 0.5): half of either over a black image
    black = np.zeros((2, 3, 3))
    mask = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])
    picture = show_mask_on_image(black, mask, alpha=0.5)
    assert isinstance(picture, Image.Image) and picture.mode == "RGB" and picture.size == (3, 2)
    array = np.asarray(picture)
    assert array.dtype == np.uint8 and array.shape == (2, 3, 3)
    assert array[0, 0].tolist() == [64, 0, 0] and array[0, 2].tolist() == [0, 0, 64]
    assert (np.asarray(show_mask_on_image(np.ones((2, 3, 3)), mask, alpha=0.0)) == 255).all()


def test_every_image_and_mask_kind_gives_the_same_picture():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    values = rng.random((6, 5)).astype(np.float32)
    images = [pixels, pixels / 255.0, Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1),
              torch.from_numpy(pixels / 255.0).permute(2, 0, 1).float(), torch.from_numpy(pixels).permute(2, 0, 1)[None],
              np.concatenate([pixels, np.full((6, 5, 1), 7, np.uint8)], axis=-1)]
    masks = [values, values[..., None], values[None], torch.from_numpy(values), torch.from_numpy(values)[None, None]]
    reference = np.asarray(show_mask_on_image(pixels, torch.from_numpy(values)[None], colormap="hot", alpha=0.3))
    for image in images:
        assert np.array_equal(np.asarray(show_mask_on_image(image, values[None], colormap="hot", alpha=0.3)), reference)
    for mask in masks:
        assert np.array_equal(np.asarray(show_mask_on_image(pixels, mask, colormap="hot", alpha=0.3)), reference)
    grey = show_mask_on_image(pixels[..., 0], values, colormap="gray", alpha=0.0)
    assert np.array_equal(np.asarray(grey), np.repeat(pixels[..., :1], 3, axis=-1))


def test_a_smaller_mask_is_resized_to_the_image():
    mask = torch.tensor([[[0.0, 1.0]]])  # left half removed, right half kept
    picture = show_mask_on_image(np.zeros((4, 8, 3)), mask, colormap="jet", alpha=1.0)
    assert picture.size == (8, 4)
    array = np.asarray(picture).astype(int)
    assert (array[:, 0, 2] > array[:, 0, 0]).all() and (array[:, -1, 0] > array[:, -1, 2]).all()  # blue | red
    assert array[0, 0].tolist() == [0, 0, 128] and array[0, -1].tolist() == [128, 0, 0]


def test_gray_alpha_one_is_the_mask_itself():
    values = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    array = np.asarray(show_mask_on_image(np.zeros((3, 4, 3)), values, colormap="gray", alpha=1.0))
    assert np.array_equal(array[..., 1], (values * 255).round().astype(np.uint8))


def test_callable_and_matplotlib_colormaps(monkeypatch):
    red = lambda v: np.stack([v, 0 * v, 0 * v, np.ones_like(v)], axis=-1)  # noqa: E731  RGBA, as matplotlib's
    picture = show_mask_on_image(np.zeros((2, 2, 3)), np.ones((2, 2)), colormap=red, alpha=1.0)
    assert np.asarray(picture)[0, 0].tolist() == [255, 0, 0]
    monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(colormaps={"viridis": red}))
    picture = show_mask_on_image(np.zeros((2, 2, 3)), np.ones((2, 2)), colormap="viridis", alpha=1.0)
    assert np.asarray(picture)[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(ValueError, match="colormap: 'nope' is neither built in"):
        show_mask_on_image(np.zeros((2, 2, 3)), np.ones((2, 2)), colormap="nope")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.raises(ValueError, match=r"colormap: 'viridis' is not built in \(built in: jet, hot, gray\); install matplotlib"):
        show_mask_on_image(np.zeros((2, 2, 3)), np.ones((2, 2)), colormap="viridis")
    assert COLORMAPS == ("jet", "hot", "gray")


def test_a_denormalised_tensor_and_a_mask_from_explain():
    from blackbox_saliency import explain

    from conftest import tiny_cnn

    images = torch.randn(1, 3, 16, 16).clamp(-1, 1)
    masks = explain(tiny_cnn(), images, 0, method="optimize", steps=1)
    picture = show_mask_on_image(denormalize(images[0], (0.5,) * 3, (0.5,) * 3), masks[0])
    assert picture.size == (16, 16)
    with pytest.raises(ValueError, match=r"image: float pixels must be in \[0, 1\].*denormalize"):
        show_mask_on_image(images[0] * 3, masks[0])


@pytest.mark.parametrize(
    "image,mask,kwargs,error,match",
    [
        (np.zeros((3, 5, 5)), np.ones((5, 5)), {}, ValueError, r"image: .*use image.transpose\(1, 2, 0\)"),
        (torch.zeros(2, 3, 4, 4), np.ones((4, 4)), {}, ValueError, r"image: expected a tensor \(3, H, W\)"),
        (np.zeros((4, 4, 3), dtype=np.int64), np.ones((4, 4)), {}, TypeError, "image: expected uint8 or float"),
        (np.full((4, 4, 3), np.nan), np.ones((4, 4)), {}, ValueError, "image: contains NaN"),
        ([[0.0]], np.ones((4, 4)), {}, TypeError, "image: expected a numpy array, a PIL image or a tensor"),
        (np.zeros((4, 4, 3)), np.ones((2, 4, 4)), {}, ValueError, r"mask: expected shape \(H, W\)"),
        (np.zeros((4, 4, 3)), np.full((4, 4), 3.0), {}, ValueError, r"mask: values must be in \[0, 1\], got 3 to 3"),
        (np.zeros((4, 4, 3)), np.ones((4, 4), dtype=np.uint8), {}, TypeError, "mask: expected float values"),
        (np.zeros((4, 4, 3)), [[1.0]], {}, TypeError, "mask: expected a tensor or a numpy array"),
        (np.zeros((4, 4, 3)), np.ones((4, 4)), {"alpha": 1.5}, ValueError, r"alpha: expected a number in \[0, 1\]"),
        (np.zeros((4, 4, 3)), np.ones((4, 4)), {"colormap": 3}, TypeError, "colormap: expected a name or a callable"),
        (np.zeros((4, 4, 3)), np.ones((4, 4)), {"colormap": lambda v: v}, ValueError, "colormap: must map values"),
    ],
)
def test_bad_input_names_the_argument(image, mask, kwargs, error, match):
    with pytest.raises(error, match=match):
        show_mask_on_image(image, mask, **kwargs)
