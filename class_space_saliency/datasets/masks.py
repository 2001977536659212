"""Object masks on the token grid: which image tokens show the object.

Masks arrive at the model's input resolution (``Preprocessing.resize_mask``); a ViT sees them
per patch. Two rules decide whether a token is object:

- ``"share"`` (default): the share of the patch's pixels inside the mask is at least
  ``threshold`` (0.5: at least half the patch). Every pixel of the patch counts, and the share
  is the quantity the localisation metrics compare maps with.
- ``"nearest"``: the mask at the patch's top-left pixel, as the official code does
  (``src/vis.py``: ``cv2.resize(mask, (grid, grid), interpolation=cv2.INTER_NEAREST)`` of the
  annotation, row ``floor(i * h / grid)``). On a whole-image input mask from
  ``resize_mask`` this picks the same annotation pixel (exactly, where OpenCV's floating
  point does not round a whole-number position down); one pixel of 16 x 16 or 32 x 32 decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOKEN_RULES = ("share", "nearest")
"""How :func:`mask_to_tokens` decides that a token is object."""


def mask_to_tokens(
    masks: torch.Tensor,
    grid: tuple[int, int],
    rule: str = "share",
    threshold: float = 0.5,
) -> torch.Tensor:
    """Object masks (at the input resolution) -> bool masks on the token grid.

    Args:
        masks: Bool (or 0/1) masks (..., H, W), e.g. (B, 1, H, W) from a dataset.
        grid: Token grid (h, w), e.g. (14, 14) for a 224 x 224 input and 16 x 16 patches.
        rule: One of :data:`TOKEN_RULES` (see the module docstring).
        threshold: For ``"share"``: the least share of a patch inside the mask, in (0, 1].
            A size that is not a multiple of the grid uses adaptive average pooling (bins of
            ``floor``/``ceil`` edges).

    Returns:
        Bool tensor (..., h, w), row-major like the image tokens (``.flatten(-2)`` gives
        the token order after the prefix tokens).

    Raises:
        ValueError: For an unknown rule, a threshold outside (0, 1], a grid that is not two
            positive ints no larger than the mask, or a mask with fewer than 2 dimensions.

    Example:
        >>> mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
        >>> mask[..., :3, :1] = True  # three pixels of the top-left 2 x 2 patch, one more below
        >>> mask_to_tokens(mask, (2, 2))[0, 0]
        tensor([[ True, False],
                [False, False]])
        >>> mask_to_tokens(mask, (2, 2), rule="nearest")[0, 0]  # top-left pixel of each patch
        tensor([[ True, False],
                [ True, False]])
    """
    if rule not in TOKEN_RULES:
        raise ValueError(f"rule must be one of {TOKEN_RULES}, got {rule!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    masks = torch.as_tensor(masks)
    if masks.dim() < 2:
        raise ValueError(f"masks must be (..., H, W), got shape {tuple(masks.shape)}")
    height, width = masks.shape[-2:]
    if (
        len(grid) != 2
        or not all(isinstance(n, int) and n > 0 for n in grid)
        or grid[0] > height
        or grid[1] > width
    ):
        raise ValueError(f"grid must be two positive ints up to the mask size, got {grid!r}")
    if rule == "nearest":
        rows = torch.arange(grid[0], device=masks.device) * height // grid[0]
        cols = torch.arange(grid[1], device=masks.device) * width // grid[1]
        return masks[..., rows, :][..., cols].bool()
    lead = masks.shape[:-2]
    share = F.adaptive_avg_pool2d(masks.reshape(-1, 1, height, width).float(), grid)
    return (share >= threshold).reshape(*lead, *grid)
