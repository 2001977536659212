"""class_space_saliency._stats bootstrap: resamples and intervals equal scipy.stats.bootstrap's."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from class_space_saliency._stats import bootstrap_indices, bootstrap_weights, percentile_interval


def scipy_interval(data: tuple, statistic, seed: int, n_boot: int, **kwargs) -> tuple:
    result = stats.bootstrap(
        data,
        statistic,
        n_resamples=n_boot,
        rng=np.random.default_rng(seed),
        method="percentile",
        vectorized=True,
        **kwargs,
    )
    return result.confidence_interval.low, result.confidence_interval.high


@pytest.mark.parametrize("seed", [0, 7])
def test_interval_of_the_mean_equals_scipy(seed):
    values = np.random.default_rng(100 + seed).exponential(size=37)
    means = bootstrap_weights(37, 500, seed) @ values
    assert percentile_interval(means) == pytest.approx(
        scipy_interval((values,), np.mean, seed, 500), abs=1e-12
    )


def test_paired_interval_of_a_nonlinear_statistic_equals_scipy():
    # the report's statistic: an AUC rule applied to the mean curve of the resampled images
    rng = np.random.default_rng(3)
    ours, theirs = rng.random((25, 6)), rng.random((25, 6))

    def normalised_sum(curves: np.ndarray, points: int = -1) -> np.ndarray:  # sum / (max * 7)
        return curves.sum(points) / (curves.max(points) * 7)

    weights = bootstrap_weights(25, 400, seed=11)
    samples = normalised_sum(weights @ ours) - normalised_sum(weights @ theirs)

    def statistic(first, second, axis):  # (curve point, resample, image): mean over images
        return normalised_sum(first.mean(axis), 0) - normalised_sum(second.mean(axis), 0)

    data = (ours.T, theirs.T)  # (curve point, image)
    expected = scipy_interval(data, statistic, seed=11, n_boot=400, paired=True, axis=-1)
    assert percentile_interval(samples) == pytest.approx(expected, abs=1e-12)


def test_weights_count_the_resampled_indices():
    indices = bootstrap_indices(5, 3, seed=2)
    weights = bootstrap_weights(5, 3, seed=2)
    by_hand = np.stack([np.bincount(row, minlength=5) / 5 for row in indices])
    np.testing.assert_array_equal(weights, by_hand)
    assert indices.min() >= 0 and indices.max() < 5


def test_percentile_interval_by_hand_and_bad_arguments():
    assert percentile_interval(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 0.5) == (1.0, 3.0)
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="no bootstrap samples"):
        percentile_interval(np.array([]))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_indices(3, 0, seed=0)
