"""class_space_saliency._stats: one Spearman, checked against scipy.stats.spearmanr."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import rankdata, spearmanr

from class_space_saliency import sanity
from class_space_saliency._stats import average_ranks, spearman


def scipy_per_row(first: torch.Tensor, second: torch.Tensor) -> list[float]:
    return [
        float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)
        for a, b in zip(first, second, strict=True)
    ]


@pytest.mark.parametrize("tied", [False, True])
def test_spearman_matches_scipy(tied):
    generator = torch.Generator().manual_seed(3)
    first = torch.randn(5, 1, 6, 7, generator=generator, dtype=torch.float64)
    second = first + torch.randn(first.shape, generator=generator, dtype=torch.float64)
    if tied:  # few distinct values: many ties of every size
        first, second = first.round(), (second * 2).round()
        assert first[0].unique().numel() < first[0].numel() // 4
    got = spearman(first, second)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(scipy_per_row(first, second), abs=1e-12)


def test_average_ranks_match_scipy_rankdata():
    values = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 1.0], [0.5, 0.5, 0.5, 0.5, -1.0, 9.0]])
    expected = torch.from_numpy(rankdata(values.numpy(), axis=1))
    torch.testing.assert_close(average_ranks(values), expected)


def test_constant_map_is_nan_and_bad_shapes_raise():
    result = spearman(torch.ones(1, 4), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert math.isnan(result.item())
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.ones(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.ones(4), torch.ones(4))


def test_sanity_uses_the_shared_spearman():
    assert sanity.spearman is spearman
