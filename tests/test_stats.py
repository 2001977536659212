"""class_space_saliency._stats against SciPy: Spearman, the signed-rank test from a histogram of
differences, McNemar's exact test, and the permutation test from histograms of values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, rankdata, spearmanr, wilcoxon

from class_space_saliency import sanity
from class_space_saliency._stats import (
    average_ranks,
    mcnemar_test,
    paired_signed_rank_test,
    permutation_test,
    signed_rank_test,
    spearman,
)


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


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_signed_rank_test_from_counts_matches_scipy(alternative):
    # paired normalised ranks of 10 classes: many ties and zero differences, as identifiability
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 10, 400), rng.integers(0, 10, 400)
    first[:150] = np.minimum(first[:150], second[:150])  # a shift, so the tails differ
    counts = np.bincount(second - first + 9, minlength=19)  # rank positions: lower = better
    # scipy on the normalised ranks times C (exact integers: float rounding would split ties)
    expected = wilcoxon(10 - first, 10 - second, alternative=alternative, method="approx")
    statistic, p_value = signed_rank_test(counts, alternative)
    assert statistic == pytest.approx(float(expected.statistic))
    assert p_value == pytest.approx(float(expected.pvalue), rel=1e-9)


def test_signed_rank_test_edge_cases():
    assert math.isnan(signed_rank_test(np.array([0, 5, 0]))[1])  # only zero differences
    with pytest.raises(ValueError, match="2M"):
        signed_rank_test(np.array([1, 2]))
    with pytest.raises(ValueError, match="alternative"):
        signed_rank_test(np.array([1, 2, 3]), "bigger")


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("n", [7, 10, 50, 51, 400])
def test_paired_signed_rank_test_matches_scipy(alternative, n):
    # real-valued pairs (per-class scores of two models): exact up to 50 pairs, as scipy
    rng = np.random.default_rng(n)
    first, second = rng.normal(size=n) + 0.2, rng.normal(size=n)
    expected = wilcoxon(
        first, second, alternative=alternative, method="exact" if n <= 50 else "approx"
    )
    statistic, p_value = paired_signed_rank_test(first, second, alternative)
    assert statistic == pytest.approx(float(expected.statistic))
    assert p_value == pytest.approx(float(expected.pvalue), rel=1e-9)


def test_paired_signed_rank_test_with_ties_and_zeros_is_the_approximation():
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 5, 40) / 4, rng.integers(0, 5, 40) / 4
    expected = wilcoxon(first, second, alternative="greater", method="approx")
    statistic, p_value = paired_signed_rank_test(torch.tensor(first), second, "greater")
    assert statistic == pytest.approx(float(expected.statistic))
    assert p_value == pytest.approx(float(expected.pvalue), rel=1e-9)
    assert math.isnan(paired_signed_rank_test(first, first)[1])
    with pytest.raises(ValueError, match="one shape"):
        paired_signed_rank_test(first, second[:3])
    with pytest.raises(ValueError, match="alternative"):
        paired_signed_rank_test(np.arange(3.0), np.zeros(3), "bigger")


def test_permutation_test_matches_shuffling():
    # the hypergeometric draw is the shuffle test in distribution: both p-values estimate
    # the same tail probability (here about 0.08), within Monte Carlo error
    rng = np.random.default_rng(1)
    values = np.linspace(0, 1, 11)
    first = rng.multinomial(60, np.full(11, 1 / 11))
    second = rng.multinomial(90, np.full(11, 1 / 11))
    pooled = np.concatenate([np.repeat(values, first), np.repeat(values, second)])
    observed = pooled[:60].mean() - pooled[60:].mean()
    shuffled = []
    for _ in range(4000):
        rng.shuffle(pooled)
        shuffled.append(pooled[:60].mean() - pooled[60:].mean())
    reference = (1 + np.sum(np.array(shuffled) >= observed - 1e-12)) / 4001
    difference, p_value = permutation_test(first, second, values, permutations=4000, seed=2)
    assert difference == pytest.approx(observed)
    assert abs(p_value - reference) < 4 * math.sqrt(reference * (1 - reference) / 4000)


def test_permutation_test_official_p_value_can_be_zero():
    values = np.array([0.0, 1.0])
    _, official = permutation_test(np.array([0, 50]), np.array([50, 0]), values, official=True)
    _, corrected = permutation_test(np.array([0, 50]), np.array([50, 0]), values, 300)
    assert official == 0.0
    assert corrected == pytest.approx(1 / 301)
    with pytest.raises(ValueError, match="observation"):
        permutation_test(np.array([0, 0]), np.array([1, 1]), values)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_mcnemar_test_matches_scipy_binomtest(alternative):
    rng = np.random.default_rng(2)
    pairs = [(9, 1), (0, 5), (5, 0), (1, 0), (3, 3), (7, 30), (50_000, 49_000)]
    pairs += [tuple(int(v) for v in rng.integers(0, 400, 2)) for _ in range(40)]
    for first_only, second_only in pairs:
        n = first_only + second_only
        statistic, p_value = mcnemar_test(first_only, second_only, alternative)
        expected = binomtest(first_only, n, 0.5, alternative=alternative).pvalue
        assert statistic == first_only
        assert p_value == pytest.approx(expected, rel=1e-9, abs=1e-300), (first_only, second_only)


def test_mcnemar_test_edge_cases():
    assert math.isnan(mcnemar_test(0, 0)[1])
    assert mcnemar_test(0, 4)[1] == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_test(-1, 3)
    with pytest.raises(ValueError, match="alternative"):
        mcnemar_test(1, 3, "bigger")
