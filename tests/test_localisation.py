"""Localisation metrics against hand-computed cases, Quantus 0.6 and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from class_space_saliency.evaluation import localisation

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


def test_maps_are_upsampled_bilinearly():
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    corner = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    corner[..., 0, 0] = True  # bilinear (align_corners=False): 1.0 at (0, 0), 0.75 at (0, 1)
    beside = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    beside[..., 0, 1] = True
    assert localisation(maps, corner)["pointing_game"].tolist() == [1.0]
    assert localisation(maps, beside)["pointing_game"].tolist() == [0.0]


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
    ours = localisation(maps, masks)
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
    with pytest.raises(ValueError, match="NaN"):
        localisation(maps.fill_(float("nan")), masks)
