"""Preprocessing: its own module, crop geometry of every timm crop mode, masks that follow it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from test_registry import PACKAGE, imported_modules

from class_space_saliency.preprocessing import Preprocessing, timm_preprocessing


def test_model_loaders_and_preprocessing_import_no_cycle():
    hub = imported_modules(PACKAGE / "hub.py")
    preprocessing = imported_modules(PACKAGE / "preprocessing.py")
    assert "models" not in hub  # models imports hub (lazily): the reverse would be a cycle
    assert not {"models", "hub", "data"} & preprocessing


def coordinate_image(width: int, height: int) -> Image.Image:
    """R = column, G = row, B = 255 (timm pads with the mean, 0 here: B = 0 marks padding)."""
    rows, cols = np.mgrid[:height, :width]
    return Image.fromarray(np.stack([cols, rows, np.full_like(rows, 255)], -1).astype(np.uint8))


def sources(prep: Preprocessing, width: int, height: int) -> tuple[np.ndarray, ...]:
    """Column, row and in-image flag of the source pixel of every input pixel (nearest, mean 0)."""
    values = (prep(coordinate_image(width, height)) * 255).round().long().numpy()
    return values[0], values[1], values[2] == 255


CROPS = [  # (mode, crop_pct): timm's default centre crop, DeiT's squash, a padded border
    ("center", 0.875),
    ("squash", 0.875),
    ("squash", 1.0),
    ("border", 1.0),
    ("border", 0.9),
]


@pytest.mark.parametrize(("mode", "crop_pct"), CROPS)
@pytest.mark.parametrize(("width", "height"), [(250, 120), (90, 200)])
def test_crop_box_is_where_timm_takes_the_pixels(mode, crop_pct, width, height):
    prep = timm_preprocessing(
        (3, 40, 48), (0,) * 3, (1,) * 3, crop_pct=crop_pct, crop_mode=mode, interpolation="nearest"
    )
    cols, rows, inside = sources(prep, width, height)
    left, top, right, bottom = prep.crop_box(width, height)
    step_x, step_y = (right - left) / 48, (bottom - top) / 40  # source pixels per input pixel
    # nearest samples pixel centres (half a step in from each edge of the image part); timm
    # rounds the crop offset to whole resized pixels (up to half a step)
    for got, start, end, step, size in (
        (cols[inside], left, right, step_x, width),
        (rows[inside], top, bottom, step_y, height),
    ):
        assert abs(got.min() - (max(start, 0) + step / 2)) <= step / 2 + 1
        assert abs(got.max() + 1 - (min(end, size) - step / 2)) <= step / 2 + 1
    padded_columns = (~inside).all(0).sum()  # border mode: the box reaches beyond the image
    padded_rows = (~inside).all(1).sum()
    assert abs(padded_columns - max(-left, 0) * 2 / step_x) <= 2
    assert abs(padded_rows - max(-top, 0) * 2 / step_y) <= 2


def test_a_squash_crop_is_not_the_centre_crop_of_the_shorter_side():
    # timm's squash mode (DeiT's processor: 256 x 256, then the centre 224): the old crop_box
    # applied the shorter-side rule to every mode
    squash = timm_preprocessing(
        (3, 224, 224), (0,) * 3, (1,) * 3, crop_pct=0.875, crop_mode="squash"
    )
    assert squash.crop_box(640, 480) == (40.0, 30.0, 600.0, 450.0)


def test_resize_mask_of_a_whole_image_resize_is_opencvs_nearest():
    # the official code resizes ImageNet-S masks with cv2.INTER_NEAREST; 500 x 375 is ImageNet's
    # commonest size (no row where OpenCV's floating point rounds differently)
    generator = np.random.default_rng(0)
    mask = generator.random((375, 500)) < 0.5
    prep = Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 224, 224))
    want = cv2.resize(mask.astype(np.uint8), (224, 224), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(prep.resize_mask(mask)[0].numpy(), want.astype(bool))


@pytest.mark.parametrize(("height", "width"), [(37, 53), (651, 7), (8, 300)])
def test_resize_mask_takes_row_i_h_over_H_exactly(height, width):
    mask = np.random.default_rng(1).random((height, width)) < 0.3
    prep = Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 16, 14))
    rows, cols = np.arange(16) * height // 16, np.arange(14) * width // 14
    got = prep.resize_mask(torch.from_numpy(mask)[None])
    assert got.shape == (1, 16, 14) and got.dtype == torch.bool
    np.testing.assert_array_equal(got[0].numpy(), mask[rows][:, cols])


@pytest.mark.parametrize(("mode", "crop_pct"), CROPS)
def test_resize_mask_follows_the_crop(mode, crop_pct):
    width, height = 250, 120
    prep = timm_preprocessing(
        (3, 40, 48), (0,) * 3, (1,) * 3, crop_pct=crop_pct, crop_mode=mode, interpolation="nearest"
    )
    cols, rows, inside = sources(prep, width, height)
    mask = np.zeros((height, width), bool)
    mask[30:90, 100:180] = True
    got = prep.resize_mask(mask)[0].numpy()
    seen = mask[rows.clip(0, height - 1), cols.clip(0, width - 1)] & inside
    left, top, right, bottom = prep.crop_box(width, height)
    # ours takes the top-left neighbour, PIL the centre one: they differ only near the edges
    near_edge = np.zeros_like(mask)
    margin = int(np.ceil(max((right - left) / 48, (bottom - top) / 40))) + 1
    near_edge[30 - margin : 90 + margin, 100 - margin : 180 + margin] = True
    near_edge[30 + margin : 90 - margin, 100 + margin : 180 - margin] = False
    edge = near_edge[rows.clip(0, height - 1), cols.clip(0, width - 1)] & inside
    np.testing.assert_array_equal(got[~edge], seen[~edge])
    assert got.any() and (got != seen).mean() < 0.1
    assert not got[~inside].any()  # padding is never object


def test_resize_mask_rejects_a_batch():
    prep = Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 8, 8))
    with pytest.raises(ValueError, match="mask must be"):
        prep.resize_mask(torch.zeros(2, 1, 8, 8, dtype=torch.bool))


def test_crop_mode_is_checked():
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 8, 8), crop_mode="middle")
