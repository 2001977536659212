"""Overlays on every input kind, map normalisation, figure helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from class_space_saliency import Identifiability
from class_space_saliency.visualize import (
    image_to_uint8,
    normalize_map,
    overlay,
    plot_identifiability,
    saliency_grid,
)

GREY = (np.arange(12 * 16).reshape(12, 16) % 256).astype(np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        GREY,
        GREY[..., None],
        np.repeat(GREY[..., None], 3, -1),
        GREY.astype(np.float32) / 255,
        torch.from_numpy(GREY).float().div(255).expand(3, -1, -1),
        torch.from_numpy(GREY).float().div(255)[None],
    ],
    ids=["uint8-hw", "uint8-hw1", "uint8-hw3", "float-hw", "tensor-3hw", "tensor-1hw"],
)
def test_overlay_accepts_every_image_kind(image):
    saliency = torch.zeros(1, 1, 3, 4)
    saliency[..., 0, 0] = 1.0
    rgb = overlay(image, saliency, colormap="jet", alpha=0.5)
    assert rgb.dtype == np.uint8 and rgb.shape == (12, 16, 3)
    base = np.repeat(GREY[..., None], 3, -1).astype(float)
    # the hot corner differs from the cold far corner; alpha=0 gives the image back
    assert not np.array_equal(rgb[0, 0], rgb[-1, -1])
    assert np.abs(overlay(image, saliency, alpha=0.0).astype(float) - base).max() <= 1


def test_overlay_blend_is_exact_for_constant_image():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    saliency = np.zeros((2, 2))  # constant map -> lowest colour of jet (dark blue, RGB 0,0,128)
    rgb = overlay(image, saliency, colormap="jet", alpha=0.25)
    np.testing.assert_array_equal(rgb[0, 0], np.round(0.75 * 100 + 0.25 * np.array([0, 0, 128])))


def test_normalisation_rules():
    signed = np.array([[-2.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(normalize_map(signed), [[0.0, 0.5], [0.75, 1.0]])  # auto
    np.testing.assert_allclose(normalize_map(signed, "minmax"), [[0, 0.5], [0.75, 1]])
    np.testing.assert_allclose(normalize_map(signed, "positive"), [[0, 0], [0.5, 1]])
    shifted = np.array([[-1.0, 0.0], [1.0, 3.0]])
    np.testing.assert_allclose(normalize_map(shifted), [[1 / 3, 0.5], [2 / 3, 1.0]])
    np.testing.assert_allclose(normalize_map(np.array([[1.0, 3.0]])), [[0.0, 1.0]])
    with pytest.raises(ValueError, match="normalization"):
        normalize_map(signed, "zscore")


def test_bad_images_and_options():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_to_uint8(np.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="colormap"):
        overlay(GREY, np.ones((2, 2)), colormap="rainbowish")
    with pytest.raises(ValueError, match="alpha"):
        overlay(GREY, np.ones((2, 2)), alpha=1.5)


def test_figures_have_the_expected_panels():
    images = [GREY, GREY]
    maps = {"a": torch.rand(2, 1, 3, 4), "b": torch.rand(2, 3, 4)}
    figure = saliency_grid(images, maps, row_titles=["x", "y"])
    assert len(figure.axes) == 2 * 3 + 1  # panels + colour bar
    result = Identifiability(
        layers=[0, 1],
        token_rank=torch.tensor([0.5, 0.9]),
        token_rate=torch.tensor([10.0, 60.0]),
        cls_rank=torch.tensor([0.4, 1.0]),
        cls_rate=torch.tensor([5.0, 90.0]),
        num_images=3,
    )
    figure = plot_identifiability(result)
    lines = figure.axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), [10.0, 60.0])


def test_overlay_figure_has_a_colour_bar_in_map_units():
    from class_space_saliency.visualize import overlay_figure

    saliency = np.array([[-0.5, 0.25], [1.0, 0.0]])
    figure = overlay_figure(GREY, saliency, colormap="viridis", box=(2, 1, 14, 11))
    bar = figure.axes[1]
    assert bar.get_ylim() == pytest.approx((-1.0, 1.0))  # symmetric: +-max|s|
    assert any("symmetric" in t.get_text() for t in figure.texts)
    figure = overlay_figure(GREY, np.abs(saliency))
    assert figure.axes[1].get_ylim() == pytest.approx((0.0, 1.0))
    assert any("min to max" in t.get_text() for t in figure.texts)


def test_saliency_grid_has_colour_bar_and_scaling_note():
    maps = {"pos": np.random.rand(2, 1, 3, 3), "signed": np.random.rand(2, 1, 3, 3) - 0.5}
    figure = saliency_grid([GREY, GREY], maps)
    assert len(figure.axes) == 2 * 3 + 1  # panels + colour bar
    assert any("scaled on its own" in t.get_text() for t in figure.texts)
    marks = [t for ax in figure.axes for t in ax.texts if t.get_text() == "±"]
    assert len(marks) == 2  # the two signed panels


def test_overlay_on_a_box_dims_what_the_model_did_not_see():
    saliency = np.ones((2, 2))
    rgb = overlay(np.full((10, 20), 200, np.uint8), saliency, alpha=0.5, box=(5, 0, 15, 10))
    assert (rgb[:, :5] == 100).all() and (rgb[:, 15:] == 100).all()
    assert not (rgb[:, 5:15] == 100).all()
