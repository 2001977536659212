"""Localisation of saliency maps against ground-truth object masks, batched in torch.

**The rule (default, ``upsample=None``): maps stay at their own resolution.** The map's
``h x w`` cells tile the ``H x W`` image evenly, and each cell gets its *mask share*: the
fraction of its area inside the mask. A cell then counts as ``share`` of a mask cell and
``1 - share`` of a background cell. Where the cells are whole pixel blocks (``H % h == 0``,
``W % w == 0``, as for a ViT's patches), every metric equals the pixel metric of the
patch-aligned (nearest) upsampled map with ties averaged, so nothing depends on how an
upsampling blends neighbouring patches. (Bilinear upsampling with a clamped border gives the
outer pixels of a border patch its unblended value, so a random map's maximum lands on the
image frame far more often than a blend's would; a random map's pointing game then sits below
chance. At the map's resolution it sits at chance: the mean mask share of the cells.)

``upsample="bilinear"`` or ``"nearest"`` instead upsamples the map to the masks' size and
scores pixels (the pixel metrics of earlier versions: ``"bilinear"``).

Every metric is in [0, 1], higher is better, and treats ties as a random tie-break would on
average, so a constant map scores the share of the image the mask covers (pointing game,
relevance rank) or 0.5 (AUROC) rather than an artefact of raster order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import check_choice
from ..methods.base import UPSAMPLE_MODES, upsample_maps

METRICS = ("pointing_game", "relevance_mass", "relevance_rank", "mask_auroc")
LOCALISATION_UPSAMPLE = (None, *UPSAMPLE_MODES)
"""Choices of ``localisation(..., upsample=)``: ``None`` scores the map on its own grid."""


def _check(maps: torch.Tensor, masks: torch.Tensor) -> None:
    if not isinstance(maps, torch.Tensor) or not maps.is_floating_point():
        raise TypeError(f"maps must be a floating-point tensor (B, 1, h, w), got {maps!r:.60}")
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        raise TypeError(f"masks must be a bool tensor (B, 1, H, W), got {masks!r:.60}")
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must have shape (B, 1, h, w), got {tuple(maps.shape)}")
    if masks.dim() != 4 or masks.shape[1] != 1 or masks.shape[0] != maps.shape[0]:
        raise ValueError(
            f"masks must have shape (B, 1, H, W) with B = {maps.shape[0]}, got {tuple(masks.shape)}"
        )
    if not torch.isfinite(maps).all():
        raise ValueError("maps contains NaN or infinite values")
    area = masks.flatten(1).sum(1)
    if ((area == 0) | (area == masks[0].numel())).any():
        raise ValueError("every mask must cover at least one pixel and leave at least one out")


def _cell_overlap(pixels: int, cells: int, device: torch.device) -> torch.Tensor:
    """(cells, pixels) float64: the share of each cell's length that each pixel covers.

    Cell ``i`` spans ``[i * pixels / cells, (i + 1) * pixels / cells)``, pixel ``y`` spans
    ``[y, y + 1)``; each row sums to 1.
    """
    edges = torch.arange(cells + 1, dtype=torch.float64, device=device) * (pixels / cells)
    starts = torch.arange(pixels, dtype=torch.float64, device=device)
    overlap = torch.minimum(edges[1:, None], starts + 1) - torch.maximum(edges[:-1, None], starts)
    return overlap.clamp(min=0) * (cells / pixels)


def mask_shares(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The share of each map cell's area that lies inside the mask.

    Args:
        masks: (B, 1, H, W) bool masks.
        grid: The map's (h, w); its cells tile the image evenly.

    Returns:
        (B, 1, h, w) float64 shares in [0, 1]; for cells of whole pixel blocks, the mean of
        the mask over the block.

    Example:
        >>> masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
        >>> masks[..., :3, :2] = True
        >>> mask_shares(masks, (2, 2))[0, 0]
        tensor([[1.0000, 0.0000],
                [0.5000, 0.0000]], dtype=torch.float64)
    """
    rows = _cell_overlap(masks.shape[-2], grid[0], masks.device)
    columns = _cell_overlap(masks.shape[-1], grid[1], masks.device)
    return rows @ masks.double() @ columns.T


def _scores(values: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four metrics of (B, P) values whose units lie ``inside`` (B, P) the mask.

    ``inside`` is each unit's share in the mask (0 or 1 for pixels); all units have the same
    area. Returns float64 (B,) pointing game, relevance mass, relevance rank and AUROC.
    """
    outside = 1 - inside
    area = inside.sum(1)  # in units

    at_max = values == values.max(1, keepdim=True).values
    pointing = (at_max * inside).sum(1) / at_max.sum(1)

    positive = values.clamp(min=0)
    total = positive.sum(1)
    within = (positive * inside).sum(1)
    mass = torch.where(total > 0, within / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)

    # the top `area` places (a fractional number for shares) go to the highest units; the
    # unit holding the last place sets the threshold, and units tied with it share what is left
    ordered = values.sort(1, descending=True).values
    last = (area - 1e-9).ceil().long().clamp(min=1) - 1
    threshold = ordered.gather(1, last[:, None])
    above, tied = values > threshold, values == threshold
    places = area - above.sum(1)
    hits = (above * inside).sum(1) + places * (tied * inside).sum(1) / tied.sum(1)
    rank = hits / area

    # Mann-Whitney U with unit weights: background weight strictly below each unit, plus half
    # of the background weight tied with it (its own background part included)
    order = values.argsort(1)
    ascending = values.gather(1, order).contiguous()
    background_below = F.pad(outside.gather(1, order).cumsum(1), (1, 0))
    lower = torch.searchsorted(ascending, values.contiguous(), side="left")
    upper = torch.searchsorted(ascending, values.contiguous(), side="right")
    below = background_below.gather(1, lower)
    tied_weight = background_below.gather(1, upper) - below
    u_statistic = (inside * (below + tied_weight / 2)).sum(1)
    auroc = u_statistic / (area * outside.sum(1))
    return pointing, mass, rank, auroc


def localisation(
    maps: torch.Tensor, masks: torch.Tensor, *, upsample: str | None = None
) -> dict[str, torch.Tensor]:
    """Pointing game, relevance mass and rank accuracy and mask AUROC of each map.

    With ``v`` the map and ``s`` each unit's share inside the mask (map cells by default, see
    the module docstring; pixels, with ``s`` 0 or 1, when ``upsample`` is given) and
    ``K = sum(s)`` the mask's area in units:

    - ``pointing_game``: mean ``s`` of the units holding the map's maximum (for a unique
      maximum, the mask share of that unit; a tie counts as a random pick among the maxima).
      A map of i.i.d. random values scores the mean share on average: the mask's area
      fraction.
    - ``relevance_mass`` (Arras et al. 2022): ``sum(v+ · s) / sum(v+)`` over the positive
      part ``v+ = max(v, 0)``; 0.0 for a map without positive values (no relevance placed in
      the mask).
    - ``relevance_rank`` (Arras et al. 2022): the ``K`` highest units' mask share,
      ``sum(s over the top K) / K``, the last unit counted by the fraction of it that fits;
      units tied with the ``K``-th highest value share the remaining places in proportion
      (the expectation over random tie-breaks).
    - ``mask_auroc``: ROC AUC of ``v`` separating mask from background, each unit counting
      ``s`` as mask and ``1 - s`` as background: the probability that a random mask pixel
      outranks a random background pixel, ties counted 1/2 (Mann-Whitney U).

    Args:
        maps: (B, 1, h, w) saliency maps on any grid.
        masks: (B, 1, H, W) bool object masks; each covers at least one pixel and not all.
        upsample: ``None`` (default): score the map on its own grid against each cell's mask
            share; ``"bilinear"`` or ``"nearest"``: upsample the map to the masks' size
            first and score pixels.

    Returns:
        ``{metric: (B,) float32 tensor}`` on the maps' device.

    Raises:
        TypeError: For non-float maps or non-bool masks.
        ValueError: For wrong shapes, non-finite maps, an empty or full mask or an unknown
            ``upsample``.

    Example:
        >>> from class_space_saliency import ClassSpaceSaliency
        >>> scores = localisation(ClassSpaceSaliency(model).attribute(images, labels), masks)
        >>> sorted(scores), scores["pointing_game"].shape
        (['mask_auroc', 'pointing_game', 'relevance_mass', 'relevance_rank'], torch.Size([3]))
    """
    check_choice("upsample", upsample, LOCALISATION_UPSAMPLE)
    _check(maps, masks)
    masks = masks.to(maps.device)
    if upsample is None:
        values = maps.flatten(1).double()
        inside = mask_shares(masks, maps.shape[-2:]).flatten(1)
    else:
        values = upsample_maps(maps, masks.shape[-2:], upsample).flatten(1).double()
        inside = masks.flatten(1).double()
    scores = _scores(values, inside)
    return {name: score.float() for name, score in zip(METRICS, scores, strict=True)}
