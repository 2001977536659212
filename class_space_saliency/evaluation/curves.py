"""Perturbation curves and their areas, batched over images and steps.

Ties in a perturbation order are broken by a permutation seeded with the image itself, so
curves do not depend on batching or sharding. All ``B * S`` perturbed inputs of a batch
(B images, S steps) go through the model in chunks of ``max_batch_size``; the perturbed
images (or token sequences) of a chunk are built in one vectorised operation, and an input
that occurs more than once (the same image with the same perturbed units, e.g. the clean
image at step 0 of every method's curve) goes through once. Token removal runs each kept
length as its own group of shorter sequences, packing proportionally more of them into a
chunk. Imputed pixels (ROAD) are solved on the CPU, the images of a chunk together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from .._seeding import image_generator
from ..adapters import find_token_path
from ..adapters.hf import hf_logits
from ..methods.base import upsample_maps
from .imputation import noisy_linear_impute
from .protocols import PerturbationProtocol


def curve_x(protocol: PerturbationProtocol, num_points: int) -> list[float]:
    """The x values (fractions of units perturbed) of a curve with ``num_points`` points.

    Example:
        >>> curve_x(PROTOCOLS["vilas2023/positive"], 3)
        [0.25, 0.5, 0.75]
    """
    if protocol.steps is None:  # every count k = 1 … N-1 of N = num_points + 1 units
        return [k / (num_points + 1) for k in range(1, num_points + 1)]
    return list(protocol.steps)


def step_counts(protocol: PerturbationProtocol, num_units: int) -> tuple[list[float], list[int]]:
    """The x values of the curve and the number of units perturbed at each step.

    Args:
        protocol: Supplies ``steps`` (fractions, or ``None`` for every count 1 … N-1).
        num_units: Pixels, patches or image tokens of one input.

    Returns:
        ``(x, counts)``: fractions perturbed and ``floor(x * num_units)`` per step.

    Example:
        >>> step_counts(PROTOCOLS["chefer2021/positive"], 20)[1]
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    """
    if protocol.steps is None:
        if num_units < 2:
            raise ValueError(f"{protocol.name}: steps=None needs at least 2 units")
        counts = list(range(1, num_units))
    else:
        # round before flooring so that e.g. 0.29 * 100 = 28.999999999999996 counts 29 units
        counts = [math.floor(round(f * num_units, 6)) for f in protocol.steps]
    return curve_x(protocol, len(counts)), counts


def area_under_curve(curves: np.ndarray, x: Sequence[float], rule: str) -> np.ndarray:
    """Area of each curve along the last axis.

    Args:
        curves: (..., S) curve values.
        x: The S x values.
        rule: ``"trapezoid"``, ``"trapezoid_percent"``, ``"mean"`` or
            ``"max_normalised_sum"`` (see
            :class:`~class_space_saliency.evaluation.protocols.PerturbationProtocol`).

    Returns:
        (...) areas.

    Example:
        >>> float(area_under_curve(np.array([1.0, 0.0]), [0.0, 1.0], "trapezoid"))
        0.5
    """
    curves = np.asarray(curves, dtype=np.float64)
    if rule == "trapezoid":
        return np.trapezoid(curves, np.asarray(x, dtype=np.float64), axis=-1)
    if rule == "trapezoid_percent":
        return np.trapezoid(curves, np.asarray(x, dtype=np.float64), axis=-1) * 100.0
    if rule == "mean":
        return curves.mean(axis=-1)
    if rule == "max_normalised_sum":  # N = S + 1 units for the S = N - 1 counts of the curve
        top = curves.max(axis=-1) * (curves.shape[-1] + 1)
        total = curves.sum(axis=-1)
        return np.divide(total, top, out=np.zeros_like(total), where=top != 0)
    raise ValueError(f"unknown AUC rule {rule!r}")


def score_logits(logits: torch.Tensor, targets: torch.Tensor, score: str) -> torch.Tensor:
    """Per-row score of ``targets`` from (G, C) logits: accuracy, probability or logit."""
    if score == "accuracy":
        return (logits.argmax(-1) == targets).float()
    if score == "probability":
        return logits.float().softmax(-1).gather(1, targets[:, None])[:, 0]
    if score == "logit":
        return logits.float().gather(1, targets[:, None])[:, 0]
    raise ValueError(f"unknown score {score!r}")


def perturbation_ranks(values: torch.Tensor, order: str, images: torch.Tensor) -> torch.Tensor:
    """Rank of every unit in the perturbation order (0 = perturbed first).

    Ties are broken at random: units are first shuffled by a permutation drawn from a
    generator seeded with the image's own values (``_seeding.image_seed``), then stably
    sorted by saliency. The order of an image therefore does not
    depend on its batch, its position in it or the sharding of the data set, and a constant
    map gives a uniformly random order.

    Args:
        values: (B, P) saliency per unit.
        order: ``"positive"`` (most salient first) or ``"negative"`` (least salient first).
        images: (B, ...) the images the maps explain (seed the tie-breaking).

    Returns:
        (B, P) long ranks.
    """
    keys = -values if order == "positive" else values
    shuffle = torch.stack(
        [torch.randperm(values.shape[1], generator=image_generator(image)) for image in images]
    ).to(values.device)
    ordering = shuffle.gather(1, torch.argsort(keys.gather(1, shuffle), dim=1, stable=True))
    positions = torch.arange(values.shape[1], device=values.device).expand_as(ordering)
    return torch.empty_like(ordering).scatter_(1, ordering, positions)


def baseline_images(
    protocol: PerturbationProtocol,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dataset_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the hidden pixels show, in the normalised space of ``images``.

    Args:
        protocol: Supplies ``baseline`` and the blur knobs.
        images: Normalised images (B, C, H, W).
        mean: Per-channel mean of the model's normalisation.
        std: Per-channel std of the model's normalisation.
        dataset_mean: Per-channel mean (C,) of the evaluated images in normalised space;
            needed by the ``"mean"`` baseline.

    Returns:
        (B, C, H, W) baseline images.
    """
    if protocol.baseline == "zero":
        return torch.zeros_like(images)
    if protocol.baseline == "blur":
        kernel, sigma = protocol.blur_kernel_size, protocol.blur_sigma
        return TF.gaussian_blur(images, [kernel, kernel], [sigma, sigma])
    if protocol.baseline == "black":
        mean_t = images.new_tensor(mean)
        value = -mean_t / images.new_tensor(std)
    elif protocol.baseline == "mean":
        if dataset_mean is None:
            raise ValueError(f"{protocol.name}: the 'mean' baseline needs dataset_mean")
        value = dataset_mean.to(images)
    else:
        raise ValueError(f"{protocol.name}: no baseline image for {protocol.baseline!r}")
    return value.view(1, -1, 1, 1).expand_as(images)


def check_token_model(model: nn.Module) -> None:
    """Raise ``TypeError`` unless tokens can be removed from ``model``'s sequence.

    The model's family adapter says how its tokens are embedded and classified (see
    :func:`~class_space_saliency.adapters.find_token_path`); timm-style ViTs need
    ``patch_embed``, ``_pos_embed`` (optionally ``patch_drop``, ``norm_pre``), ``blocks``,
    ``norm``, ``forward_head`` and ``num_prefix_tokens``.
    """
    find_token_path(model)


def embed_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Token sequence (B, prefix + N, D) after position embeddings (and ``norm_pre``)."""
    return find_token_path(model).embed(images)


def classify_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from a (shortened) token sequence: blocks, final norm, the model's head."""
    return find_token_path(model).classify(tokens)


def _image_forward(
    model: nn.Module, images: torch.Tensor, baseline: torch.Tensor, grid: tuple[int, int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Forward of images whose visible units (G, P) come from the image, the rest baseline."""

    def forward(rows: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        mask = visible.view(-1, 1, *grid)
        if mask.shape[-2:] != images.shape[-2:]:
            mask = F.interpolate(mask.float(), size=images.shape[-2:], mode="nearest").bool()
        return hf_logits(model(torch.where(mask, images[rows], baseline[rows])))

    return forward


def _imputed_forward(
    model: nn.Module, images: torch.Tensor, noise: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Forward of images whose hidden pixels are filled by noisy linear imputation.

    The noise of each input is seeded by its image and its number of kept pixels, so it does
    not depend on batching either.
    """

    def forward(rows: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        keep = visible.view(-1, *images.shape[-2:])
        kept = keep.flatten(1).sum(1).tolist()
        generators = [
            image_generator(images[row], count)
            for row, count in zip(rows.tolist(), kept, strict=True)
        ]
        return hf_logits(model(noisy_linear_impute(images[rows], keep, noise, generators)))

    return forward


def _token_forward(
    model: nn.Module, tokens: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Forward of token sequences that keep the prefix and the visible image tokens."""
    path = find_token_path(model)
    prefix = path.num_prefix_tokens

    def forward(rows: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        count = int(visible[0].sum())  # every row of a chunk keeps as many tokens
        kept = visible.nonzero()[:, 1].view(rows.shape[0], count)  # raster order per row
        image_tokens = tokens[rows, prefix:]
        index = kept[..., None].expand(-1, -1, image_tokens.shape[-1])
        sequence = torch.cat([tokens[rows, :prefix], image_tokens.gather(1, index)], 1)
        return path.classify(sequence)

    return forward


def _unit_values(
    protocol: PerturbationProtocol, maps: torch.Tensor, images: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Saliency per perturbation unit, flattened (B, P), and the unit grid."""
    if maps.dim() != 4 or maps.shape[:2] != (images.shape[0], 1):
        raise ValueError(
            f"maps must have shape (B, 1, h, w) with B = {images.shape[0]}, got {tuple(maps.shape)}"
        )
    maps = maps.to(images.device, torch.float32)
    if protocol.unit == "pixel":
        maps = upsample_maps(maps, images.shape[-2:], protocol.upsample)
    return maps.flatten(1), (maps.shape[-2], maps.shape[-1])


def _packed_bits(mask: torch.Tensor) -> torch.Tensor:
    """(R, P) bool -> (R, ceil(P / 64)) int64 words holding the same bits (a compact key)."""
    padded = F.pad(mask.to(torch.uint8), (0, -mask.shape[1] % 64))
    powers = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8, device=mask.device)
    packed = (padded.view(mask.shape[0], -1, 8) * powers).sum(-1, dtype=torch.uint8)
    return packed.view(torch.int64)


def _distinct_rows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of (R, K) ``keys``.

    Returns:
        ``(first, inverse)``: the index of each distinct row's first occurrence, ascending,
        and (R,) the position in ``first`` of every row's key.

    Example:
        >>> _distinct_rows(torch.tensor([[2], [1], [2]]))
        (tensor([0, 1]), tensor([0, 1, 0]))
    """
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    rows = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full_like(inverse[: int(inverse.max()) + 1], keys.shape[0])
    first = first.scatter_reduce(0, inverse, rows, "amin")
    order = torch.argsort(first)
    return first[order], torch.argsort(order)[inverse]


@torch.no_grad()
def perturbation_scores(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    protocol: PerturbationProtocol,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    max_batch_size: int = 256,
    dataset_mean: torch.Tensor | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Every score of ``protocol`` (``score`` and ``extra_scores``) along its path.

    Same arguments as :func:`perturbation_curves`.

    Returns:
        ``(x, {score: curves (B, S)})``, float32 curves on the CPU.

    Example:
        >>> x, scores = perturbation_scores(model, images, maps, labels,
        ...     PROTOCOLS["road2022/morf"], mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> scores["accuracy"].shape  # 3 images, 9 steps
        torch.Size([3, 9])
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    values, grid = _unit_values(protocol, maps, images)
    ranks = perturbation_ranks(values, protocol.order, images)
    num_units = values.shape[1]
    x, counts = step_counts(protocol, num_units)
    insertion = protocol.mode == "insertion"
    if protocol.unit == "token":
        path = find_token_path(model)
        tokens = path.embed(images)
        prefix = path.num_prefix_tokens
        if tokens.shape[1] - prefix != num_units:
            raise ValueError(
                f"maps have {num_units} patches but the model made "
                f"{tokens.shape[1] - prefix} image tokens"
            )
        forward = _token_forward(model, tokens)
    elif protocol.baseline == "impute":
        forward = _imputed_forward(model, images, protocol.impute_noise)
        prefix = 0
    else:
        baseline = baseline_images(protocol, images, mean, std, dataset_mean)
        forward = _image_forward(model, images, baseline, grid)
        prefix = 0

    # group the steps by input length (image inputs all have the full length)
    full_length = prefix + num_units
    groups: dict[int, list[int]] = {}
    for step, count in enumerate(counts):
        visible = count if insertion else num_units - count
        length = prefix + visible if protocol.unit == "token" else full_length
        groups.setdefault(length, []).append(step)

    batch = images.shape[0]
    device = images.device
    names = dict.fromkeys((protocol.score, *protocol.extra_scores))
    scores = {name: torch.empty(batch, len(counts)) for name in names}
    targets = targets.to(device)
    counts_t = torch.tensor(counts, device=device)
    # identical images (e.g. one image explained by several methods) with the same perturbed
    # units are one input: each distinct (image, perturbed units) goes through the model once
    image_ids = torch.unique(images.flatten(1), dim=0, return_inverse=True)[1]
    for length, steps in groups.items():
        step_index = torch.tensor(steps, device=device).repeat_interleave(batch)
        rows = torch.arange(batch, device=device).repeat(len(steps))
        chunk = max(1, max_batch_size * full_length // max(length, 1))
        keys = torch.cat(
            [
                torch.cat([image_ids[r, None], _packed_bits(ranks[r] < counts_t[s, None])], 1)
                for r, s in zip(rows.split(chunk), step_index.split(chunk), strict=True)
            ]
        )
        first, inverse = _distinct_rows(keys)
        logits = []
        for part in first.split(chunk):
            r, s = rows[part], step_index[part]
            perturbed = ranks[r] < counts_t[s, None]
            logits.append(forward(r, perturbed if insertion else ~perturbed))
        every = torch.cat(logits)[inverse]
        r, s = rows.cpu(), step_index.cpu()
        for name, curves in scores.items():
            curves[r, s] = score_logits(every, targets[rows], name).cpu()
    return x, scores


def shared_random_order_maps(
    grid: tuple[int, int], orders: int, order: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Maps whose perturbation order is one of the official shared random token orders.

    Order ``p`` is ``π = torch.randperm(N, generator=torch.Generator().manual_seed(p))`` of
    the ``N = h * w`` image tokens (Vilas et al.'s ``compute_random``); removing ``n`` tokens
    keeps ``π[: N - n]``. The map of order ``p`` ranks the tokens so that a deletion curve in
    the direction ``order`` removes them from the end of ``π``: values ``N - j`` at ``π[j]``
    for ``"negative"`` (least salient first), ``j + 1`` for ``"positive"``. All values
    differ, so no tie-break is involved.

    Args:
        grid: The patch grid (h, w).
        orders: Number of orders ``k`` (seeds ``0 … k-1``).
        order: The protocol's ``"positive"`` or ``"negative"``.
        device: Device of the maps.

    Returns:
        (k, 1, h, w) float32 maps, the same for every image.

    Example:
        >>> shared_random_order_maps((1, 3), 1, "negative")  # randperm(3) of seed 0: [2, 0, 1]
        tensor([[[[2., 1., 3.]]]])
    """
    count = grid[0] * grid[1]
    position = torch.arange(count, dtype=torch.float32)
    value = count - position if order == "negative" else position + 1
    maps = torch.empty(orders, count)
    for seed in range(orders):
        permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        maps[seed, permutation] = value
    return maps.view(orders, 1, *grid).to(device)


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    protocol: PerturbationProtocol,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    max_batch_size: int = 256,
    dataset_mean: torch.Tensor | None = None,
) -> tuple[list[float], torch.Tensor]:
    """Score of ``targets`` along the perturbation path of ``protocol``, for every image.

    Args:
        model: The classifier (in eval mode); a timm-style ViT for token protocols.
        images: Normalised images (B, C, H, W) on the model's device.
        maps: Saliency (B, 1, h, w) on the patch grid (h * w = image tokens for tokens).
        targets: (B,) class scored per image.
        protocol: The perturbation test.
        mean: Per-channel mean of the model's normalisation (pixel protocols).
        std: Per-channel std of the model's normalisation.
        max_batch_size: Inputs per forward pass; token sequences shorter than the full one
            are packed in proportionally larger chunks.
        dataset_mean: Normalised per-channel mean for the ``"mean"`` baseline.

    Returns:
        ``(x, curves)``: the S x values and float32 curves (B, S) on the CPU.

    Example:
        >>> x, curves = perturbation_curves(model, images, maps, labels,
        ...     PROTOCOLS["chefer2021/positive"], mean=(0.5,) * 3, std=(0.5,) * 3)
    """
    x, scores = perturbation_scores(
        model,
        images,
        maps,
        targets,
        protocol,
        mean=mean,
        std=std,
        max_batch_size=max_batch_size,
        dataset_mean=dataset_mean,
    )
    return x, scores[protocol.score]
