"""Batches from any data source, and accumulators that keep analyses in bounded memory.

Every analysis takes ``data`` in one of these forms and reads it through :func:`stream`:

- a tensor of normalised images (B, C, H, W): labelled with the model's own predictions;
- an ``(images, labels)`` or ``(images, labels, masks)`` tuple of tensors (labels: ints,
  a list or a (B,) tensor; masks: (B, 1, H, W) or (B, H, W) bool object masks);
- a map-style dataset (``torch.utils.data.Dataset``, or anything with ``__len__`` and
  ``__getitem__`` that is not a list or tuple) of ``(image, label[, mask])`` items;
- any other iterable of batches in the tensor or tuple forms above, or dicts with
  ``images``/``pixel_values``, ``labels`` and optional ``masks`` (a ``DataLoader``).

Batches are moved to the model's device and cut to ``batch_size`` images, so a large tensor
never goes through the model at once; the analyses keep counts, sums and histograms (or
per-image values, bounded by the number of images asked for), never token states.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .._stats import signed_rank_test
from .._validation import check_inputs, check_target
from ..anatomy import ViTAnatomy

Data = Any
"""What the analyses accept as ``data`` (see the module docstring)."""


@dataclass
class Batch:
    """One batch of a stream.

    Attributes:
        images: Normalised images (B, C, H, W) on the model's device.
        labels: Class per image (B,) int64 on the model's device.
        masks: Object masks (B, 1, H, W) bool on the model's device, or ``None``.
        offset: Position of the batch's first image in the stream.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    offset: int


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a parameterless model."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), torch.empty(0))
    return tensor.device


def stream(
    anatomy: ViTAnatomy,
    data: Data,
    *,
    num_images: int | None = None,
    batch_size: int = 32,
    masks: bool = False,
    progress: bool | None = None,
    desc: str = "",
) -> Iterator[Batch]:
    """Iterate ``data`` as :class:`Batch` es of at most ``batch_size`` images.

    Args:
        anatomy: The model's anatomy (device, class count, predictions for unlabelled data).
        data: Images, an ``(images, labels[, masks])`` tuple, a dataset or an iterable of
            batches (see the module docstring).
        num_images: Stop after this many images (default: all).
        batch_size: Images per batch handed to the analysis.
        masks: Require object masks (raise a ``ValueError`` if a batch has none).
        progress: Show a progress bar (``None``: only on a terminal).
        desc: The progress bar's label.

    Yields:
        Batches on the model's device.

    Raises:
        TypeError: For data of an unsupported form, non-float images or labels that are not
            integers.
        ValueError: For images the model cannot take, mismatched lengths, labels out of
            range, missing masks, or bad ``num_images``/``batch_size``.

    Example:
        >>> from class_space_saliency import ViTAnatomy
        >>> batches = stream(ViTAnatomy.from_model(model), (images, labels), batch_size=2)
        >>> [batch.images.shape[0] for batch in batches]
        [2, 1]
    """
    for name, value in (("batch_size", batch_size), ("num_images", num_images)):
        if value is None and name == "num_images":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    device = model_device(anatomy.model)
    total = _known_length(data)
    if num_images is not None:
        total = num_images if total is None else min(total, num_images)
    offset = 0
    with tqdm(total=total, desc=desc or None, unit="img", disable=_disabled(progress)) as bar:
        for images, labels, found_masks in _raw_batches(data, batch_size):
            for start in range(0, images.shape[0], batch_size):
                if num_images is not None and offset >= num_images:
                    return
                stop = start + batch_size
                if num_images is not None:
                    stop = min(stop, start + num_images - offset)
                batch = _checked_batch(
                    anatomy,
                    images[start:stop],
                    None if labels is None else labels[start:stop],
                    None if found_masks is None else found_masks[start:stop],
                    masks,
                    device,
                    offset,
                )
                yield batch
                offset += batch.images.shape[0]
                bar.update(batch.images.shape[0])
    if offset == 0:
        raise ValueError("data holds no images")


def _disabled(progress: bool | None) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    return None if progress is None else not progress


def _is_dataset(data: Data) -> bool:
    """A map-style dataset of items (not a list or tuple of batches)."""
    return (
        isinstance(data, torch.utils.data.Dataset)
        or (hasattr(data, "__getitem__") and hasattr(data, "__len__"))
    ) and not isinstance(data, list | tuple | str | bytes | torch.Tensor | Mapping)


def _is_batch_tuple(data: Data) -> bool:
    return isinstance(data, list | tuple) and len(data) > 0 and _is_image_tensor(data[0])


def _is_image_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _known_length(data: Data) -> int | None:
    """The number of images, where it can be read without iterating."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if _is_batch_tuple(data):
        return data[0].shape[0]
    if _is_dataset(data):
        return len(data)
    dataset = getattr(data, "dataset", None)  # a DataLoader
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return None


def _raw_batches(
    data: Data, batch_size: int
) -> Iterator[tuple[torch.Tensor, Any, torch.Tensor | None]]:
    """``(images, labels or None, masks or None)`` of every batch, before checks."""
    if isinstance(data, torch.Tensor) or _is_batch_tuple(data):
        yield _unpack(data)
    elif _is_dataset(data):
        for start in range(0, len(data), batch_size):
            items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            yield _stack_items(items)
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes | Mapping):
        for element in data:
            yield _unpack(element)
    else:
        raise TypeError(
            "data must be images (B, C, H, W), an (images, labels[, masks]) tuple, a dataset of "
            f"(image, label[, mask]) items or an iterable of batches, got {type(data).__name__}"
        )


def _unpack(element: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """One batch in tensor, tuple or dict form -> ``(images, labels, masks)``."""
    if isinstance(element, Mapping):
        images = next(
            (element[k] for k in ("images", "pixel_values", "image") if k in element), None
        )
        labels = next((element[k] for k in ("labels", "label") if k in element), None)
        masks = next((element[k] for k in ("masks", "mask") if k in element), None)
        element = (images, labels) if masks is None else (images, labels, masks)
    if _is_image_tensor(element):
        return element, None, None
    if _is_batch_tuple(element) and len(element) in (2, 3):
        return element[0], element[1], element[2] if len(element) == 3 else None
    raise TypeError(
        "each batch must be images (B, C, H, W), an (images, labels[, masks]) tuple or a dict "
        f"with 'images' and 'labels', got {type(element).__name__}"
        + (f" of {len(element)} items" if isinstance(element, list | tuple) else "")
    )


def _stack_items(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dataset items ``(image, label[, mask])`` -> one batch."""
    sizes = {len(item) if isinstance(item, list | tuple) else 0 for item in items}
    if sizes - {2, 3} or len(sizes) != 1:
        raise TypeError("dataset items must be (image, label) or (image, label, mask) tuples")
    images = torch.stack([torch.as_tensor(item[0]) for item in items])
    labels = torch.as_tensor([int(item[1]) for item in items])
    masks = torch.stack([torch.as_tensor(item[2]) for item in items]) if sizes == {3} else None
    return images, labels, masks


def _checked_batch(
    anatomy: ViTAnatomy,
    images: torch.Tensor,
    labels: Any,
    masks: torch.Tensor | None,
    need_masks: bool,
    device: torch.device,
    offset: int,
) -> Batch:
    check_inputs(images, anatomy)
    images = images.to(device)
    labels = check_target(labels, images.shape[0], anatomy.num_classes)
    if labels is None:
        with torch.no_grad():
            labels = anatomy.forward(images).argmax(-1)
    if masks is None:
        if need_masks:
            raise ValueError(
                "this analysis needs object masks: pass (images, labels, masks) batches or a "
                "dataset of (image, label, mask) items"
            )
    else:
        masks = _checked_masks(masks, images).to(device)
    return Batch(images, labels.to(device), masks, offset)


def _checked_masks(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    masks = torch.as_tensor(masks)
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    expected = (images.shape[0], 1, *images.shape[-2:])
    if tuple(masks.shape) != expected:
        raise ValueError(f"masks must have shape {expected} (B, 1, H, W), got {tuple(masks.shape)}")
    return masks.bool()


class RankHistogram:
    """Counts of the label's rank position per block: how many tokens rank it ``k``-th.

    Position 0 is top-1; the normalised rank (identifiability) of position ``k`` is
    ``1 - k / C``. The counts, (L, C) int64, hold the whole distribution in memory that does
    not grow with the number of images; histograms of two streams merge by adding.

    Args:
        num_layers: Blocks (rows).
        num_classes: Classes ``C`` (columns).

    Example:
        >>> histogram = RankHistogram(1, 4)
        >>> histogram.add(torch.tensor([[0, 0, 1, 3]]))
        >>> histogram.top1().tolist(), histogram.mean_rank().tolist()
        ([50.0], [0.75])
    """

    def __init__(self, num_layers: int, num_classes: int) -> None:
        self.counts = torch.zeros(num_layers, num_classes, dtype=torch.int64)

    @property
    def num_classes(self) -> int:
        """Classes ``C``."""
        return self.counts.shape[1]

    def add(self, positions: torch.Tensor) -> None:
        """Count rank positions (L, ...) (any trailing shape: images, tokens); negative
        positions (no token there) are not counted."""
        flat = positions.reshape(positions.shape[0], -1).long().cpu()
        valid = flat >= 0
        self.counts.scatter_add_(1, flat * valid, valid.long())

    def merge(self, other: RankHistogram) -> RankHistogram:
        """Add another histogram's counts (same shape) to this one; returns ``self``."""
        self.counts += other.counts
        return self

    def total(self) -> torch.Tensor:
        """(L,) tokens counted per block."""
        return self.counts.sum(1)

    def values(self) -> torch.Tensor:
        """(C,) normalised rank of each position, ``1 - k / C``."""
        return 1 - torch.arange(self.num_classes, dtype=torch.float64) / self.num_classes

    def mean_rank(self) -> torch.Tensor:
        """(L,) mean normalised rank of the label (NaN for an empty block)."""
        return (self.counts.double() @ self.values()) / self.total().double()

    def top1(self) -> torch.Tensor:
        """(L,) % of tokens whose top-1 class is the label."""
        return 100 * self.counts[:, 0].double() / self.total().double()

    def quantiles(self, q: Sequence[float]) -> torch.Tensor:
        """(L, len(q)) quantiles ``min{r : P(R <= r) >= q}`` of the normalised rank ``R``.

        ``R <= 1 - k/C`` means position ``>= k``, so the quantile is at the largest position
        ``k`` whose share of positions below it is at most ``1 - q``.

        Example:
            >>> histogram = RankHistogram(1, 4)  # normalised ranks 1, 1, 0.75, 0.25
            >>> histogram.add(torch.tensor([[0, 0, 1, 3]]))
            >>> histogram.quantiles([0.0, 0.5, 1.0]).tolist()
            [[0.25, 0.75, 1.0]]
        """
        below = self.counts.double().cumsum(1) / self.total().double()[:, None]
        levels = torch.tensor([1 - float(p) for p in q], dtype=torch.float64)
        levels = levels.expand(len(below), -1).contiguous()
        positions = torch.searchsorted(below.contiguous(), levels + 1e-12, right=True)
        return self.values()[positions.clamp(max=self.num_classes - 1)]


class RankDifferenceHistogram:
    """Counts of paired differences of the label's rank position per block.

    For tokens paired across two conditions (a model and its baseline at the same image and
    token; a token with and without other tokens removed), the difference ``second - first``
    of rank positions lies in ``-(C - 1) … C - 1``: its histogram, (L, 2C - 1) int64, is all
    that the Wilcoxon signed-rank test needs (:func:`~class_space_saliency._stats.
    signed_rank_test`), in memory that does not grow with the data. A positive difference
    means the first condition ranks the label higher (is more identifiable).

    Args:
        num_layers: Blocks (rows).
        num_classes: Classes ``C``.

    Example:
        >>> differences = RankDifferenceHistogram(1, 3)
        >>> differences.add(torch.tensor([[0, 0, 1]]), torch.tensor([[2, 1, 1]]))
        >>> differences.counts.tolist()  # differences -2 … 2
        [[0, 0, 1, 1, 1]]
    """

    def __init__(self, num_layers: int, num_classes: int) -> None:
        self.counts = torch.zeros(num_layers, 2 * num_classes - 1, dtype=torch.int64)

    def add(self, first: torch.Tensor, second: torch.Tensor) -> None:
        """Count the differences of paired rank positions (L, ...) of the two conditions;
        pairs with a negative position (no token there) are not counted."""
        valid = ((first >= 0) & (second >= 0)).reshape(first.shape[0], -1).cpu()
        shift = (second - first).reshape(first.shape[0], -1).long().cpu()
        shift += (self.counts.shape[1] - 1) // 2
        self.counts.scatter_add_(1, shift * valid, valid.long())

    def p_values(self, alternative: str = "greater") -> torch.Tensor:
        """(L,) Wilcoxon signed-rank p-values; ``"greater"``: the first condition ranks the
        label higher. NaN for a block without nonzero differences."""
        return torch.tensor(
            [signed_rank_test(row.numpy(), alternative)[1] for row in self.counts],
            dtype=torch.float64,
        )
