"""Noisy linear imputation of removed pixels (Rong et al., ICML 2022, ROAD).

Each removed pixel becomes the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct
and 1/12 for the 4 diagonal neighbours); neighbours outside the image are left out and the
remaining weights renormalised. Removed neighbours are unknowns too, so the values of all
removed pixels of an image solve one sparse linear system (all channels at once), and
Gaussian noise is added to the imputed pixels only.

The system matrix is symmetric, diagonally dominant and nonsingular (every group of removed
pixels borders a kept one), so it is positive definite; in raster order its bandwidth is at
most ``W + 1``. The systems of a group of images are stacked into one banded system and
solved by a banded Cholesky factorisation (LAPACK ``pbsv``), which for image-sized grids is
faster than a general sparse LU and gives the same solution to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch

# (row offset, column offset, weight) of the 8 neighbours
NEIGHBOURS = tuple(
    (dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dy, dx) != (0, 0)
)
GROUP_PIXELS = 2**16
"""Images are solved together in groups of at most this many pixels (at least one image)."""


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


def _solve(images: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Values (M, C) of the M removed pixels of (B, C, H, W) images, image by image in raster order.

    The B systems are stacked block-diagonally (no equation couples two images) and solved
    as one banded positive definite system.
    """
    _, channels, height, width = images.shape
    keep_flat = keep.reshape(-1)
    removed = np.flatnonzero(~keep_flat)  # index into (B, H, W)
    image, pixel = np.divmod(removed, height * width)
    rows, cols = np.divmod(pixel, width)
    unknown = np.full(keep_flat.size, -1)
    unknown[removed] = np.arange(removed.size)
    flat = images.transpose(1, 0, 2, 3).reshape(channels, -1)
    diagonal = np.zeros(removed.size)
    rhs = np.zeros((removed.size, channels))
    upper_i, upper_j, upper_w = [], [], []
    for dy, dx, weight in NEIGHBOURS:
        r, c = rows + dy, cols + dx
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        equation = np.flatnonzero(inside)
        neighbour = (image[inside] * height + r[inside]) * width + c[inside]
        diagonal[equation] += weight
        known = keep_flat[neighbour]
        rhs[equation[known]] += weight * flat[:, neighbour[known]].T
        partner = unknown[neighbour[~known]]
        later = partner > equation[~known]  # the upper triangle; the matrix is symmetric
        upper_i.append(equation[~known][later])
        upper_j.append(partner[later])
        upper_w.append(np.full(int(later.sum()), -weight))
    upper_i, upper_j = np.concatenate(upper_i), np.concatenate(upper_j)
    band = int((upper_j - upper_i).max(initial=0))
    banded = np.zeros((band + 1, removed.size))  # LAPACK upper band storage
    banded[band] = diagonal
    banded[band + upper_i - upper_j, upper_j] = np.concatenate(upper_w)
    return scipy.linalg.solveh_banded(banded, rhs, check_finite=False)


def noisy_linear_impute(
    images: torch.Tensor,
    keep: torch.Tensor,
    noise: float = 0.01,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Fill the removed pixels of each image by noisy linear imputation (ROAD).

    Each removed pixel ``i`` satisfies ``x_i = sum_j w_j x_j / sum_j w_j`` over its neighbours
    ``j`` inside the image (weights 1/6 direct, 1/12 diagonal), where removed neighbours are
    unknowns too; one sparse system per image is solved in float64 for all channels at once
    (SciPy, on the CPU; the systems of several images are stacked into one banded system),
    then ``noise * N(0, 1)`` is added to every imputed value. Kept pixels are returned
    unchanged. With ``noise=0`` this equals pytorch-grad-cam's ``NoisyLinearImputer(noise=0)``
    (the ROAD authors' imputer), including its border rule.

    Args:
        images: (B, C, H, W) floating-point images (any value space; the imputation is affine
            equivariant, so normalised and pixel space give the same fill before noise).
        keep: (B, H, W) bool, True where the pixel is kept, False where it is imputed; every
            image must keep at least one pixel.
        noise: Standard deviation of the Gaussian noise on imputed pixels (>= 0).
        generator: CPU generator of the noise (default: the global RNG), drawn image by image
            in batch order, ``(C, M)`` values for an image with ``M`` removed pixels; or a
            sequence of B generators, one per image.

    Returns:
        (B, C, H, W) images of the input's dtype and device.

    Raises:
        TypeError: For non-float images or a non-bool ``keep``.
        ValueError: For mismatched shapes, a negative ``noise``, an image with no kept pixel
            or a sequence of generators whose length is not B.

    Example:
        >>> keep = torch.rand(3, 32, 32) > 0.5  # images: (3, 3, 32, 32)
        >>> filled = noisy_linear_impute(images, keep, noise=0.01)
        >>> torch.equal(filled[:, :, keep[0]][0], images[0][:, keep[0]])  # kept pixels stay
        True
    """
    _check(images, keep, noise)
    batch = images.shape[0]
    if generator is None or isinstance(generator, torch.Generator):
        generators = [generator] * batch
    else:
        generators = list(generator)
        if len(generators) != batch:
            raise ValueError(
                f"generator must be one generator or {batch} (one per image), got {len(generators)}"
            )
    result = images.detach().cpu().clone()
    source = result.double().numpy()
    keep_np = keep.detach().cpu().numpy()
    group = max(1, GROUP_PIXELS // keep_np[0].size) if batch else 1
    for start in range(0, batch, group):
        indices = [i for i in range(start, min(start + group, batch)) if not keep_np[i].all()]
        if not indices:
            continue
        solution = _solve(source[indices], keep_np[indices])
        offset = 0
        for index in indices:
            removed = torch.from_numpy(~keep_np[index])
            count = int(removed.sum())
            values = torch.from_numpy(solution[offset : offset + count]).T.to(result.dtype)
            offset += count
            if noise:
                draw = torch.randn(values.shape, generator=generators[index])
                values = values + noise * draw.to(values)
            result[index][:, removed] = values
    return result.to(images.device)
