"""Rank statistics shared by the sanity check and the speed benchmark."""

from __future__ import annotations

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
