"""Rank statistics shared by the sanity check and the speed benchmark."""

from __future__ import annotations

import numpy as np
import torch


def spearman(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image between two batches of maps.

    Ties get their average rank (as ``scipy.stats.spearmanr``). Where either map is constant
    the correlation is undefined and NaN.

    Args:
        first: Maps (B, ...), e.g. (B, 1, h, w).
        second: Maps of the same shape.

    Returns:
        (B,) float64 correlations in [-1, 1].

    Raises:
        ValueError: If the shapes differ or have no batch dimension.

    Example:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 30.0, 20.0]]))
        tensor([0.5000], dtype=torch.float64)
    """
    if first.shape != second.shape or first.dim() < 2:
        raise ValueError(
            f"maps must have the same shape (B, ...), got {tuple(first.shape)} and "
            f"{tuple(second.shape)}"
        )
    ranks = [average_ranks(maps.detach().flatten(1).double().cpu()) for maps in (first, second)]
    centred = [r - r.mean(1, keepdim=True) for r in ranks]
    covariance = (centred[0] * centred[1]).sum(1)
    scale = (centred[0].square().sum(1) * centred[1].square().sum(1)).sqrt()
    return (covariance / scale).clamp(-1, 1)  # 0 / 0 = NaN for constant maps


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim of (B, n) values; tied values share their mean rank.

    Args:
        values: (B, n) values.

    Returns:
        (B, n) float64 ranks.

    Example:
        >>> average_ranks(torch.tensor([[3.0, 1.0, 3.0]]))
        tensor([[2.5000, 1.0000, 2.5000]], dtype=torch.float64)
    """
    ordered = values.sort(-1).values
    below = torch.searchsorted(ordered, values, right=False)
    up_to = torch.searchsorted(ordered, values, right=True)
    return (below + up_to + 1).double() / 2


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Indices of ``n_boot`` bootstrap resamples of ``n`` observations.

    Drawn as ``scipy.stats.bootstrap`` draws them (``rng.integers(0, n, (n_boot, n))`` with
    ``rng = numpy.random.default_rng(seed)``), so the intervals below equal scipy's
    ``method="percentile"`` intervals for the same seed.

    Args:
        n: Observations (images).
        n_boot: Resamples.
        seed: Seed of the generator.

    Returns:
        (n_boot, n) int64 indices in ``[0, n)``.

    Raises:
        ValueError: If ``n`` or ``n_boot`` is below 1.

    Example:
        >>> bootstrap_indices(3, 2, seed=0).shape
        (2, 3)
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"n and n_boot must be >= 1, got n={n}, n_boot={n_boot}")
    return np.random.default_rng(seed).integers(0, n, (n_boot, n))


def bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Resampling weights: how often each observation occurs in each resample, over ``n``.

    ``bootstrap_weights(n, b, s) @ values`` is the mean of every resample of
    :func:`bootstrap_indices` ``(n, b, s)``, for values of any trailing shape (e.g. per-image
    curves (n, S)): one matrix product instead of ``b`` gathers.

    Returns:
        (n_boot, n) float64 weights; each row sums to 1.

    Example:
        >>> bootstrap_weights(4, 1000, seed=0).sum(1).min()
        np.float64(1.0)
    """
    indices = bootstrap_indices(n, n_boot, seed)
    rows = np.arange(n_boot)[:, None] * n
    counts = np.bincount((indices + rows).ravel(), minlength=n_boot * n)
    return counts.reshape(n_boot, n) / n


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central percentile interval of a bootstrap distribution (linear interpolation).

    Args:
        samples: (n_boot,) bootstrap replicates of a statistic.
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles.

    Raises:
        ValueError: For a confidence outside (0, 1) or no samples.

    Example:
        >>> percentile_interval(np.arange(5.0), confidence=0.5)
        (1.0, 3.0)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    samples = np.asarray(samples, dtype=np.float64)
    if samples.size == 0:
        raise ValueError("no bootstrap samples")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return float(low), float(high)
