"""Localisation metrics against hand-computed cases, Quantus 0.6 and scikit-learn.

By default maps are scored on their own grid against each cell's mask share; with
``upsample=`` they are upsampled and scored per pixel (the cases against Quantus).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from class_space_saliency.evaluation import localisation
from class_space_saliency.evaluation.localisation import mask_shares

quantus = pytest.importorskip("quantus")
metrics = pytest.importorskip("sklearn.metrics")


def test_hand_computed_case_with_ties():
    maps = torch.tensor([[[[0.5, 2.0, -1.0], [2.0, 0.0, 1.0]]]])
    masks = torch.tensor([[[[False, True, False], [False, True, True]]]])
    scores = localisation(maps, masks)  # same grid: the upsampling is the identity
    assert scores["pointing_game"].tolist() == [0.5]  # maximum 2.0 tied, one of two inside
    # positive relevance 0.5 + 2 + 2 + 1 = 5.5, inside 2 + 0 + 1 = 3
    assert scores["relevance_mass"].tolist() == pytest.approx([3 / 5.5])
    # K = 3: both 2.0 pixels (one inside) and the 1.0 pixel (inside) -> 2 of 3
    assert scores["relevance_rank"].tolist() == pytest.approx([2 / 3])
    # mask pixels {2, 0, 1} vs background {0.5, 2, -1}: 2.5 + 1 + 2 of 9 pairs
    assert scores["mask_auroc"].tolist() == pytest.approx([5.5 / 9])


def test_rank_ties_share_the_remaining_places_and_constant_maps():
    maps = torch.tensor([[[[3.0, 1.0, 1.0, 1.0]]]])
    masks = torch.tensor([[[[False, True, False, False]]]])
    # K = 1: the single top place goes to 3.0, outside
    assert localisation(maps, masks)["relevance_rank"].tolist() == [0.0]
    masks = torch.tensor([[[[False, True, True, False]]]])
    # K = 2: 3.0 (outside) + one place shared by three 1.0 pixels, two inside -> (0 + 2/3) / 2
    assert localisation(maps, masks)["relevance_rank"].tolist() == pytest.approx([1 / 3])
    constant = localisation(torch.zeros(1, 1, 2, 2), masks[..., :2].reshape(1, 1, 1, 2))
    assert constant["pointing_game"].tolist() == [0.5]  # mask covers half of the image
    assert constant["relevance_rank"].tolist() == [0.5]
    assert constant["mask_auroc"].tolist() == [0.5]
    assert constant["relevance_mass"].tolist() == [0.0]  # no positive relevance at all
    negative = localisation(-torch.ones(1, 1, 2, 2), masks[..., :2].reshape(1, 1, 1, 2))
    assert negative["relevance_mass"].tolist() == [0.0]


def test_maps_are_upsampled_bilinearly_on_request():
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    corner = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    corner[..., 0, 0] = True  # bilinear (align_corners=False): 1.0 at (0, 0), 0.75 at (0, 1)
    beside = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    beside[..., 0, 1] = True
    assert localisation(maps, corner, upsample="bilinear")["pointing_game"].tolist() == [1.0]
    assert localisation(maps, beside, upsample="bilinear")["pointing_game"].tolist() == [0.0]
    # on the map's grid both masks cover a quarter of the top-left cell, the maximum
    assert localisation(maps, corner)["pointing_game"].tolist() == [0.25]
    assert localisation(maps, beside)["pointing_game"].tolist() == [0.25]


def random_case(seed: int, batch: int = 6):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(batch, 1, 4, 4, generator=generator)
    blobs = torch.rand(batch, 1, 4, 4, generator=generator)
    masks = F.interpolate(blobs, size=(16, 16), mode="bilinear") > 0.6
    masks[:, :, 0, 0], masks[:, :, -1, -1] = True, False  # never empty, never full
    # in float64: pixels of equal value (the clamped border) are then equal to the last bit
    upsampled = F.interpolate(maps.double(), size=(16, 16), mode="bilinear", align_corners=False)
    return maps, masks, upsampled.float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_quantus_and_sklearn(seed):
    maps, masks, upsampled = random_case(seed)
    ours = localisation(maps, masks, upsample="bilinear")
    a = upsampled.numpy()
    s = masks.float().numpy()
    x, y = np.zeros_like(a), np.zeros(a.shape[0], dtype=int)
    mass = quantus.RelevanceMassAccuracy(disable_warnings=True)(
        model=None, x_batch=x, y_batch=y, a_batch=np.clip(a, 0, None), s_batch=s
    )
    rank = quantus.RelevanceRankAccuracy(disable_warnings=True)(
        model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s
    )
    assert ours["relevance_mass"].tolist() == pytest.approx(np.asarray(mass, float), abs=1e-5)
    assert ours["relevance_rank"].tolist() == pytest.approx(np.asarray(rank, float), abs=1e-6)
    flat_a, flat_s = a.reshape(a.shape[0], -1), masks.reshape(a.shape[0], -1).numpy()
    # Quantus's PointingGame fails on NumPy 2: the maximum pixel by hand
    pointing = [float(m[np.argmax(v)]) for v, m in zip(flat_a, flat_s, strict=True)]
    assert ours["pointing_game"].tolist() == pointing
    auroc = [metrics.roc_auc_score(m, v) for v, m in zip(flat_a, flat_s, strict=True)]
    assert ours["mask_auroc"].tolist() == pytest.approx(auroc, abs=1e-6)


def test_auroc_ties_count_half_as_in_sklearn():
    maps = torch.tensor([[[[0.0, 1.0, 1.0, 0.0, 2.0, 1.0]]]])
    masks = torch.tensor([[[[True, True, False, False, True, False]]]])
    expected = metrics.roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert localisation(maps, masks)["mask_auroc"].tolist() == pytest.approx([expected])


def test_bad_arguments():
    maps, masks = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    masks[:, :, 0, 0] = True
    with pytest.raises(TypeError, match="masks"):
        localisation(maps, masks.float())
    with pytest.raises(TypeError, match="maps"):
        localisation(maps.long(), masks)
    with pytest.raises(ValueError, match="maps must have shape"):
        localisation(maps[:, 0], masks)
    with pytest.raises(ValueError, match="masks must have shape"):
        localisation(maps, masks[:1])
    with pytest.raises(ValueError, match="at least one pixel"):
        localisation(maps, torch.zeros_like(masks))
    with pytest.raises(ValueError, match="upsample must be one of"):
        localisation(maps, masks, upsample="bicubic")
    with pytest.raises(ValueError, match="NaN"):
        localisation(maps.fill_(float("nan")), masks)


# ---------------------------------------------------------------- the map's own resolution
def test_native_rule_by_hand_on_a_hand_made_mask():
    maps = torch.tensor([[[[3.0, 1.0], [-1.0, 1.0]]]])
    masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    masks[..., 0, :] = True  # top row: half of each top cell
    masks[..., 1:3, 2:4] = True  # and rows 1-2 of the right half
    # shares: top-left 2/4, top-right 4/4, bottom-left 0/4, bottom-right 2/4 -> K = 2 cells
    scores = localisation(maps, masks)
    assert scores["pointing_game"].tolist() == [0.5]  # the maximum 3.0 is the top-left cell
    # positive relevance 3 + 1 + 1 = 5, inside 3 * 0.5 + 1 * 1 + 1 * 0.5 = 3
    assert scores["relevance_mass"].tolist() == pytest.approx([3 / 5])
    # K = 2: the top-left cell (share 0.5), then one place for the two cells tied at 1.0
    # (shares 1 and 0.5): 0.5 + 1 * (1.5 / 2) = 1.25 of 2
    assert scores["relevance_rank"].tolist() == pytest.approx([1.25 / 2])
    # mask weights (0.5, 1, 0, 0.5), background (0.5, 0, 1, 0.5), each 2 in all: per mask
    # weight, the background below plus half the background tied (a cell's own included):
    # 3.0: 0.5 * (1.5 + 0.5 / 2); each 1.0 cell: (1 + 0.5) * (1 + 0.5 / 2)
    assert scores["mask_auroc"].tolist() == pytest.approx([(0.875 + 1.5 * 1.25) / 4])


def test_native_rule_equals_pixel_metrics_of_the_patch_aligned_map():
    # whole pixel blocks per cell: the pixel metrics of the nearest-upsampled map, computed
    # independently by Quantus (mass, rank) and scikit-learn (AUROC), with ties averaged
    maps, masks, _ = random_case(4, batch=5)
    ours = localisation(maps, masks)
    pixels = F.interpolate(maps, size=(16, 16), mode="nearest").numpy()
    x, y, s = np.zeros_like(pixels), np.zeros(5, dtype=int), masks.float().numpy()
    mass = quantus.RelevanceMassAccuracy(disable_warnings=True)(
        model=None, x_batch=x, y_batch=y, a_batch=np.clip(pixels, 0, None), s_batch=s
    )
    assert ours["relevance_mass"].tolist() == pytest.approx(np.asarray(mass, float), abs=1e-5)
    flat_a, flat_s = pixels.reshape(5, -1), masks.reshape(5, -1).numpy()
    auroc = [metrics.roc_auc_score(m, v) for v, m in zip(flat_a, flat_s, strict=True)]
    assert ours["mask_auroc"].tolist() == pytest.approx(auroc, abs=1e-6)
    # every maximum pixel is equally likely to be picked: the share of them in the mask
    pointing = [m[v == v.max()].mean() for v, m in zip(flat_a, flat_s, strict=True)]
    assert ours["pointing_game"].tolist() == pytest.approx(pointing, abs=1e-6)
    # top-K pixels with ties spread by their expected share (Quantus takes one raster order)
    for v, m, got in zip(flat_a, flat_s, ours["relevance_rank"].tolist(), strict=True):
        k = int(m.sum())
        threshold = np.sort(v)[::-1][k - 1]
        above, tied = v > threshold, v == threshold
        hits = m[above].sum() + (k - above.sum()) * m[tied].mean()
        assert got == pytest.approx(hits / k, abs=1e-6)


FRAME_FREE = torch.ones(1, 1, 32, 32, dtype=torch.bool)
FRAME_FREE[..., :2, :] = FRAME_FREE[..., -2:, :] = False
FRAME_FREE[..., :, :2] = FRAME_FREE[..., :, -2:] = False
# on an 8 x 8 grid of 4-pixel cells: 36 inner cells in, 24 edge cells half in, 4 corners 1/4
FRAME_FREE_CHANCE = (36 + 24 / 2 + 4 / 4) / 64


def test_every_cell_holding_the_maximum_once_averages_the_mask_share():
    maps = torch.eye(64).view(64, 1, 8, 8)  # one map per cell, that cell the maximum
    scores = localisation(maps, FRAME_FREE.expand(64, -1, -1, -1))
    assert scores["pointing_game"].double().mean().item() == pytest.approx(FRAME_FREE_CHANCE)


def test_random_maps_point_at_chance_on_the_map_grid_only():
    # i.i.d. maps: the maximum is a uniformly random cell, so the expected pointing game is
    # the mask's area fraction; bilinear upsampling moves a border cell's maximum onto the
    # 2-pixel frame, outside this mask (fails on the pixel rule of earlier versions)
    n = 4000
    maps = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = FRAME_FREE.expand(n, -1, -1, -1)
    native = localisation(maps, masks)["pointing_game"].double()
    standard_error = native.std().item() / n**0.5  # about 0.004
    assert native.mean().item() == pytest.approx(FRAME_FREE_CHANCE, abs=4 * standard_error)
    bilinear = localisation(maps, masks, upsample="bilinear")["pointing_game"].double()
    assert bilinear.mean().item() < FRAME_FREE_CHANCE - 0.1  # 36 / 64: inner cells only
    assert localisation(maps, masks)["mask_auroc"].double().mean().item() == pytest.approx(
        0.5, abs=0.01
    )


def test_cells_that_split_pixels_count_the_overlap():
    # a 2-cell row over 3 pixels: each cell is 1.5 pixels long, the middle pixel half in each
    masks = torch.tensor([[[[False, True, True]]]])
    assert mask_shares(masks, (1, 2)).flatten().tolist() == pytest.approx([1 / 3, 1.0])
    maps = torch.tensor([[[[1.0, 0.0]]]])
    assert localisation(maps, masks)["pointing_game"].tolist() == pytest.approx([1 / 3])
