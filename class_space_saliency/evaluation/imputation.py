"""Noisy linear imputation of removed pixels (Rong et al., ICML 2022, ROAD).

Each removed pixel becomes the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct
and 1/12 for the 4 diagonal neighbours); neighbours outside the image are left out and the
remaining weights renormalised. Removed neighbours are unknowns too, so the values of all
removed pixels of an image solve one sparse linear system (all channels at once), and
Gaussian noise is added to the imputed pixels only.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

# (row offset, column offset, weight) of the 8 neighbours
NEIGHBOURS = tuple(
    (dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dy, dx) != (0, 0)
)


def _check(images: torch.Tensor, keep: torch.Tensor, noise: float) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (B, C, H, W), got {images!r:.60}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor (B, H, W), got {getattr(keep, 'dtype', keep)}")
    wanted = (images.shape[0], *images.shape[-2:])
    if tuple(keep.shape) != wanted:
        raise ValueError(f"keep must have shape (B, H, W) = {wanted}, got {tuple(keep.shape)}")
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    if images.shape[0] and not keep.flatten(1).any(1).all():
        raise ValueError(
            "keep must keep at least one pixel of every image (nothing to impute from)"
        )


def _solve(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Values (M, C) of the M removed pixels (raster order) of one (C, H, W) image."""
    height, width = keep.shape
    removed = np.flatnonzero(~keep.ravel())
    rows, cols = np.divmod(removed, width)
    unknown = np.full(height * width, -1)
    unknown[removed] = np.arange(removed.size)
    flat = image.reshape(image.shape[0], -1)
    diagonal = np.zeros(removed.size)
    rhs = np.zeros((removed.size, image.shape[0]))
    entries_i, entries_j, entries_w = [], [], []
    for dy, dx, weight in NEIGHBOURS:
        r, c = rows + dy, cols + dx
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        equation = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        diagonal[equation] += weight
        known = keep.ravel()[neighbour]
        rhs[equation[known]] += weight * flat[:, neighbour[known]].T
        entries_i.append(equation[~known])
        entries_j.append(unknown[neighbour[~known]])
        entries_w.append(np.full(int((~known).sum()), -weight))
    size = removed.size
    matrix = scipy.sparse.coo_matrix(
        (
            np.concatenate([diagonal, *entries_w]),
            (
                np.concatenate([np.arange(size), *entries_i]),
                np.concatenate([np.arange(size), *entries_j]),
            ),
        ),
        shape=(size, size),
    ).tocsc()
    solution = scipy.sparse.linalg.spsolve(matrix, rhs)
    return np.asarray(solution).reshape(size, image.shape[0])


def noisy_linear_impute(
    images: torch.Tensor,
    keep: torch.Tensor,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill the removed pixels of each image by noisy linear imputation (ROAD).

    Each removed pixel ``i`` satisfies ``x_i = sum_j w_j x_j / sum_j w_j`` over its neighbours
    ``j`` inside the image (weights 1/6 direct, 1/12 diagonal), where removed neighbours are
    unknowns too; one sparse system per image is solved in float64 for all channels at once
    (SciPy, on the CPU), then ``noise * N(0, 1)`` is added to every imputed value. Kept pixels
    are returned unchanged. With ``noise=0`` this equals pytorch-grad-cam's
    ``NoisyLinearImputer(noise=0)`` (the ROAD authors' imputer), including its border rule.

    Args:
        images: (B, C, H, W) floating-point images (any value space; the imputation is affine
            equivariant, so normalised and pixel space give the same fill before noise).
        keep: (B, H, W) bool, True where the pixel is kept, False where it is imputed; every
            image must keep at least one pixel.
        noise: Standard deviation of the Gaussian noise on imputed pixels (>= 0).
        generator: CPU generator of the noise (default: the global RNG); drawn image by image
            in batch order, ``(C, M)`` values for an image with ``M`` removed pixels.

    Returns:
        (B, C, H, W) images of the input's dtype and device.

    Raises:
        TypeError: For non-float images or a non-bool ``keep``.
        ValueError: For mismatched shapes, a negative ``noise`` or an image with no kept pixel.

    Example:
        >>> keep = torch.rand(3, 32, 32) > 0.5  # images: (3, 3, 32, 32)
        >>> filled = noisy_linear_impute(images, keep, noise=0.01)
        >>> torch.equal(filled[:, :, keep[0]][0], images[0][:, keep[0]])  # kept pixels stay
        True
    """
    _check(images, keep, noise)
    result = images.detach().cpu().clone()
    source = result.double().numpy()
    keep_np = keep.detach().cpu().numpy()
    for index in range(images.shape[0]):
        if keep_np[index].all():
            continue
        values = torch.from_numpy(_solve(source[index], keep_np[index])).T.to(result.dtype)
        if noise:
            values = values + noise * torch.randn(values.shape, generator=generator).to(values)
        removed = torch.from_numpy(~keep_np[index])
        result[index][:, removed] = values
    return result.to(images.device)
