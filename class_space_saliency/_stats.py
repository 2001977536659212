"""Statistics of the package, in one place: rank correlation, signed-rank, McNemar and
permutation tests, and the bootstrap of the benchmark's intervals.

Every test here is checked against SciPy in ``tests/test_stats.py``.
"""

from __future__ import annotations

import math

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


def signed_rank_test(
    differences: np.ndarray | torch.Tensor, alternative: str = "greater"
) -> tuple[float, float]:
    """Wilcoxon signed-rank test from counts of integer paired differences.

    Paired values that live on a grid (normalised ranks ``1 - k/C``) have differences on a
    grid too, so a histogram of them holds everything the test needs, in memory that does
    not grow with the number of pairs. Zero differences are dropped (``zero_method="wilcox"``),
    tied magnitudes share their average rank, and the p-value is the normal approximation
    with the tie correction, as ``scipy.stats.wilcoxon(x, y, method="approx")``.

    Args:
        differences: (2M + 1,) counts of the differences ``-M … M`` (index ``M`` = zero).
        alternative: ``"greater"`` (the first value of a pair tends to be larger),
            ``"less"`` or ``"two-sided"``.

    Returns:
        ``(statistic, p_value)``: the sum of the ranks of the positive differences (of the
        smaller of the positive and negative sums for ``"two-sided"``, as SciPy), and the
        p-value (NaN without any nonzero difference).

    Raises:
        ValueError: For an even-length or negative histogram, or an unknown alternative.

    Example:
        >>> statistic, p = signed_rank_test(np.array([0, 1, 0, 2, 1]))  # -1, +1, +1, +2
        >>> statistic, round(p, 4)
        (8.0, 0.1284)
    """
    counts = np.asarray(differences, dtype=np.float64)
    if counts.ndim != 1 or counts.size % 2 == 0 or (counts < 0).any():
        raise ValueError(
            f"differences must be (2M + 1,) non-negative counts, got shape {counts.shape}"
        )
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(
            f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}"
        )
    middle = counts.size // 2
    positive, negative = counts[middle + 1 :], counts[:middle][::-1]
    tied = positive + negative  # pairs per magnitude 1 … M
    n = tied.sum()
    if n == 0:
        return 0.0, float("nan")
    average_rank = np.cumsum(tied) - (tied - 1) / 2
    statistic = float((average_rank * positive).sum())
    mean = n * (n + 1) / 4
    variance = n * (n + 1) * (2 * n + 1) / 24 - (tied**3 - tied).sum() / 48
    z = (statistic - mean) / math.sqrt(variance) if variance > 0 else 0.0
    if alternative == "greater":
        p_value = _normal_sf(z)
    elif alternative == "less":
        p_value = _normal_sf(-z)
    else:
        p_value = min(1.0, 2 * _normal_sf(abs(z)))
        statistic = min(statistic, n * (n + 1) / 2 - statistic)
    return statistic, p_value


EXACT_SIGNED_RANK_LIMIT = 50
"""Pairs up to which :func:`paired_signed_rank_test` uses the exact null distribution."""


def paired_signed_rank_test(
    first: np.ndarray | torch.Tensor,
    second: np.ndarray | torch.Tensor,
    alternative: str = "greater",
) -> tuple[float, float]:
    """Wilcoxon signed-rank test of paired real values (e.g. per-class scores of two models).

    Zero differences are dropped. With at most :data:`EXACT_SIGNED_RANK_LIMIT` nonzero pairs
    and no tied magnitudes the p-value is exact (the statistic's distribution over all
    ``2^n`` sign assignments, as ``scipy.stats.wilcoxon(method="exact")``); otherwise it is
    the normal approximation with the tie correction of :func:`signed_rank_test` (the test
    depends on the differences only through their signs and the order of their magnitudes,
    so they enter it as signed dense ranks), as ``method="approx"``.

    Args:
        first: (n,) values of the first member of each pair.
        second: (n,) values of the second member.
        alternative: ``"greater"`` (first tends to be larger), ``"less"`` or ``"two-sided"``.

    Returns:
        ``(statistic, p_value)`` as :func:`signed_rank_test` (NaN without a nonzero pair).

    Raises:
        ValueError: For arrays that are not (n,) of one shape, or an unknown alternative.

    Example:
        >>> statistic, p = paired_signed_rank_test(np.arange(1.0, 6.0), np.zeros(5))
        >>> statistic, p  # every sign positive: 1 of 2^5 assignments
        (15.0, 0.03125)
    """
    first, second = (
        np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
        for t in (first, second)
    )
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(
            f"first and second must be (n,) arrays of one shape, got {first.shape} and "
            f"{second.shape}"
        )
    differences = first - second
    differences = differences[differences != 0]
    magnitudes, dense = np.unique(np.abs(differences), return_inverse=True)
    signed = np.sign(differences).astype(np.int64) * (dense + 1)
    n = differences.size
    if n == 0 or n > EXACT_SIGNED_RANK_LIMIT or magnitudes.size < n:
        histogram = np.bincount(signed + magnitudes.size, minlength=2 * magnitudes.size + 1)
        return signed_rank_test(histogram, alternative)
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(
            f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}"
        )
    statistic = int(signed[signed > 0].sum())  # ranks are the dense ranks: no ties
    counts = np.zeros(n * (n + 1) // 2 + 1)  # sign assignments per positive rank sum
    counts[0] = 1
    for rank in range(1, n + 1):
        counts[rank:] = counts[rank:] + counts[:-rank].copy()
    probability = counts / counts.sum()
    upper = float(probability[statistic:].sum())
    lower = float(probability[: statistic + 1].sum())
    if alternative == "greater":
        return float(statistic), upper
    if alternative == "less":
        return float(statistic), lower
    return float(min(statistic, n * (n + 1) // 2 - statistic)), min(1.0, 2 * min(upper, lower))


def permutation_test(
    first: np.ndarray | torch.Tensor,
    second: np.ndarray | torch.Tensor,
    values: np.ndarray | torch.Tensor,
    permutations: int = 300,
    seed: int = 0,
    official: bool = False,
) -> tuple[float, float]:
    """One-sided permutation test of ``mean(first) > mean(second)`` from value histograms.

    Shuffling the group labels of pooled observations and taking the first group's share is
    drawing that many observations without replacement from the pool: a multivariate
    hypergeometric draw of counts, so the test runs on histograms (bounded memory) and is
    exactly the shuffle test in distribution.

    Args:
        first: (V,) counts of each value in the first group (e.g. object tokens).
        second: (V,) counts in the second group (e.g. context tokens).
        values: (V,) the values the counts refer to.
        permutations: Random relabellings.
        seed: Seed of the relabellings (NumPy ``default_rng``).
        official: The p-value of the paper's code, ``#{shuffled > observed} / permutations``
            (0 when no relabelling exceeds the observation); default
            ``(1 + #{shuffled >= observed}) / (1 + permutations)``, which is never 0 and is
            a valid p-value (Phipson & Smyth 2010).

    Returns:
        ``(observed difference of means, p_value)``.

    Raises:
        ValueError: For mismatched shapes, an empty group or ``permutations < 1``.

    Example:
        >>> values = np.array([0.0, 1.0])
        >>> difference, p = permutation_test(np.array([1, 9]), np.array([9, 1]), values)
        >>> round(difference, 2), p < 0.01
        (0.8, True)
    """
    first, second, values = (
        np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t) for t in (first, second, values)
    )
    if not first.shape == second.shape == values.shape or first.ndim != 1:
        raise ValueError(
            f"first, second and values must be (V,) arrays of one shape, got {first.shape}, "
            f"{second.shape}, {values.shape}"
        )
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    first, second = first.astype(np.int64), second.astype(np.int64)
    n_first, n_second = int(first.sum()), int(second.sum())
    if n_first == 0 or n_second == 0:
        raise ValueError("both groups need at least one observation")
    values = values.astype(np.float64)
    total = float((first + second) @ values)
    observed = float(first @ values) / n_first - float(second @ values) / n_second
    draws = np.random.default_rng(seed).multivariate_hypergeometric(
        first + second, n_first, size=permutations
    )
    sums = draws @ values
    shuffled = sums / n_first - (total - sums) / n_second
    if official:
        return observed, float((shuffled > observed).sum() / permutations)
    # a relative tolerance, so that float rounding of an equal split counts as equal
    at_least = shuffled >= observed - 1e-12 * max(1.0, abs(observed))
    return observed, float((1 + at_least.sum()) / (1 + permutations))


def mcnemar_test(
    first_only: int, second_only: int, alternative: str = "greater"
) -> tuple[int, float]:
    """Exact McNemar test of paired binary outcomes, from the two discordant counts.

    Of pairs where exactly one member has the outcome (a token's label logit rises under one
    model but not under the other, say), ``first_only`` have it in the first member. Under
    the null hypothesis each discordant pair goes either way with probability 1/2, so
    ``first_only ~ Binomial(first_only + second_only, 1/2)``; concordant pairs carry no
    information. The p-value is the exact binomial tail (as ``scipy.stats.binomtest(
    first_only, n, 0.5, alternative)``), summed in log space from the tail's edge.

    Args:
        first_only: Pairs with the outcome in the first member only.
        second_only: Pairs with the outcome in the second member only.
        alternative: ``"greater"`` (the first member has the outcome more often), ``"less"``
            or ``"two-sided"``.

    Returns:
        ``(first_only, p_value)``; the p-value is NaN without discordant pairs.

    Raises:
        ValueError: For negative counts or an unknown alternative.

    Example:
        >>> statistic, p = mcnemar_test(9, 1)  # P(X >= 9), X ~ Binomial(10, 1/2)
        >>> statistic, round(p, 6)
        (9, 0.010742)
    """
    first_only, second_only = int(first_only), int(second_only)
    if first_only < 0 or second_only < 0:
        raise ValueError(f"counts must be non-negative, got {first_only} and {second_only}")
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(
            f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}"
        )
    n = first_only + second_only
    if n == 0:
        return first_only, float("nan")
    greater = _binomial_half_upper_tail(first_only, n)
    less = _binomial_half_upper_tail(n - first_only, n)  # symmetric: P(X <= k) = P(X >= n - k)
    if alternative == "greater":
        return first_only, greater
    if alternative == "less":
        return first_only, less
    return first_only, min(1.0, 2 * min(greater, less))


def _binomial_half_upper_tail(k: int, n: int) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, 1/2)``, exact to float64 rounding.

    The smaller tail is summed from its edge over the terms that matter (they fall by more
    than ``e^-60`` within ``40 sqrt(n)`` steps of the edge, so longer tails add nothing),
    the larger one as its complement.
    """
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    window = int(40 * math.sqrt(n)) + 10
    if 2 * k >= n:  # upper tail, terms fall from k upwards
        ks = torch.arange(k, min(n, k + window) + 1, dtype=torch.float64)
        return min(1.0, _log_pmf_sum(ks, n))
    ks = torch.arange(max(0, k - 1 - window), k, dtype=torch.float64)  # lower tail P(X < k)
    return max(0.0, 1.0 - _log_pmf_sum(ks, n))


def _log_pmf_sum(ks: torch.Tensor, n: int) -> float:
    """``sum_k C(n, k) / 2^n`` over ``ks``, in log space."""
    log_pmf = math.lgamma(n + 1) - torch.lgamma(ks + 1) - torch.lgamma(n - ks + 1) - n * math.log(2)
    return float(torch.logsumexp(log_pmf, 0).exp())


def _normal_sf(z: float) -> float:
    """Upper tail of the standard normal distribution."""
    return 0.5 * math.erfc(z / math.sqrt(2))


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
