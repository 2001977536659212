"""Localisation of saliency maps against ground-truth object masks, batched in torch.

Maps are bilinearly upsampled (``align_corners=False``) to the masks' size first. Every
metric is in [0, 1], higher is better, and treats ties as a random tie-break would on
average, so a constant map scores the share of the image the mask covers (pointing game,
relevance rank) or 0.5 (AUROC) rather than an artefact of raster order.
"""

from __future__ import annotations

import torch

from ..methods.base import upsample_maps

METRICS = ("pointing_game", "relevance_mass", "relevance_rank", "mask_auroc")


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


def localisation(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pointing game, relevance mass and rank accuracy and mask AUROC of each map.

    With ``v`` the upsampled map and ``M`` the mask of an image (``K = |M|`` pixels):

    - ``pointing_game``: share of the pixels holding the map's maximum that lie in ``M``
      (1.0 or 0.0 for a unique maximum; a tie counts as a random pick among the maxima).
    - ``relevance_mass`` (Arras et al. 2022): ``sum(v+ in M) / sum(v+)`` over the positive
      part ``v+ = max(v, 0)``; 0.0 for a map without positive values (no relevance placed in
      the mask).
    - ``relevance_rank`` (Arras et al. 2022): share of the ``K`` highest pixels that lie in
      ``M``. Pixels tied with the ``K``-th highest value share the remaining places in
      proportion (the expectation over random tie-breaks).
    - ``mask_auroc``: ROC AUC of ``v`` separating mask from background pixels, i.e. the
      probability that a random mask pixel outranks a random background pixel, ties counted
      1/2 (Mann-Whitney U with average ranks).

    Args:
        maps: (B, 1, h, w) saliency maps on any grid.
        masks: (B, 1, H, W) bool object masks; each covers at least one pixel and not all.

    Returns:
        ``{metric: (B,) float32 tensor}`` on the maps' device.

    Raises:
        TypeError: For non-float maps or non-bool masks.
        ValueError: For wrong shapes, non-finite maps or an empty or full mask.

    Example:
        >>> from class_space_saliency import ClassSpaceSaliency
        >>> scores = localisation(ClassSpaceSaliency(model).attribute(images, labels), masks)
        >>> sorted(scores), scores["pointing_game"].shape
        (['mask_auroc', 'pointing_game', 'relevance_mass', 'relevance_rank'], torch.Size([3]))
    """
    _check(maps, masks)
    masks = masks.to(maps.device)
    values = upsample_maps(maps, masks.shape[-2:]).flatten(1).double()
    inside = masks.flatten(1)
    area = inside.sum(1)

    at_max = values == values.max(1, keepdim=True).values
    pointing = (at_max & inside).sum(1) / at_max.sum(1)

    positive = values.clamp(min=0)
    total = positive.sum(1)
    within = (positive * inside).sum(1)
    mass = torch.where(total > 0, within / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)

    ordered = values.sort(1, descending=True).values
    threshold = ordered.gather(1, (area - 1)[:, None])
    above, tied = values > threshold, values == threshold
    places = area - above.sum(1)  # top-K places left for the tied pixels
    hits = (above & inside).sum(1) + places * (tied & inside).sum(1) / tied.sum(1)
    rank = hits / area

    ascending = ordered.flip(1).contiguous()
    lower = torch.searchsorted(ascending, values.contiguous(), side="left")
    upper = torch.searchsorted(ascending, values.contiguous(), side="right")
    average_rank = (lower + upper + 1) / 2  # 1-based, ties averaged
    background = inside.shape[1] - area
    u_statistic = (average_rank * inside).sum(1) - area * (area + 1) / 2
    auroc = u_statistic / (area * background)

    return {
        name: score.float()
        for name, score in zip(METRICS, (pointing, mass, rank, auroc), strict=True)
    }
