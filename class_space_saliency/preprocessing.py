"""Preprocessing: how a model wants its images (size, crop, normalisation, class names).

Kept apart from :mod:`.models` (which re-exports :class:`Preprocessing`) so that the model
loaders (:mod:`.models`, :mod:`.hub`) and the data readers share it without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

from .classes import class_index

CROP_MODES = ("center", "squash", "border")
"""timm's evaluation crop modes: the shorter side fills the crop's scale size and the centre is
cropped (``center``); each side is resized to its scale size, aspect ratio lost, then the centre
is cropped (``squash``); the longer side fits and the rest is padded (``border``)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its images: size, crop, normalisation and class names.

    Calling it turns a PIL image, a uint8/float array or a [0, 1] tensor into the model's
    normalised (C, H, W) float tensor. Without a ``transform``, images are converted to the
    model's channel count (grey replicated to RGB, RGB averaged to grey) and resized to the
    input size (bilinear, whole image, no crop). :meth:`crop_box` tells which region of an
    image the model sees, and :meth:`resize_mask` maps an object mask onto the model input.

    Attributes:
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation.
        input_size: (C, H, W) the model expects.
        class_names: Names of the classes, where known.
        transform: Optional PIL -> tensor transform (timm's eval transform) used instead.
        crop_pct: With ``transform``: timm's crop fraction (the image is resized so that the
            crop's scale size is ``floor(H / crop_pct)``, then the centre (H, W) is cropped);
            ``None`` for a transform that keeps the whole image.
        crop_mode: With ``crop_pct``: how timm resizes before the crop, one of
            :data:`CROP_MODES` (``"center"``: the shorter side to the scale size; ``"squash"``:
            both sides to it, aspect ratio lost; ``"border"``: the longer side to it, padded).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None
    transform: Callable | None = None
    crop_pct: float | None = None
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1] or None, got {self.crop_pct!r}")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (..., C, H, W) -> normalised model inputs."""
        return (images - self._stat(self.mean, images)) / self._stat(self.std, images)

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised model inputs (..., C, H, W) -> [0, 1] images (not clipped)."""
        return inputs * self._stat(self.std, inputs) + self._stat(self.mean, inputs)

    @staticmethod
    def _stat(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocess one image into a normalised (C, H, W) float tensor."""
        channels, height, width = self.input_size
        if self.transform is not None:
            return self.transform(_to_pil(image).convert("RGB"))
        pil = _to_pil(image).convert("RGB" if channels == 3 else "L")
        pil = pil.resize((width, height), Image.BILINEAR)
        array = np.asarray(pil, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).reshape(height, width, -1).permute(2, 0, 1)
        return self.normalize(tensor)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region ``(left, top, right, bottom)`` of a ``width`` x ``height`` image that
        the model sees after preprocessing (the whole image unless a crop is used; beyond the
        image where ``"border"`` mode pads).

        Example:
            >>> prep = Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 224, 224),
            ...                      transform=lambda image: image, crop_pct=0.875)  # timm's
            >>> prep.crop_box(640, 480)  # shorter side to 256, then the centre 224 x 224
            (110.0, 30.0, 530.0, 450.0)
            >>> squash = Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 224, 224),  # to 256 x 256
            ...                        transform=lambda image: image, crop_pct=0.875,
            ...                        crop_mode="squash")
            >>> squash.crop_box(640, 480)
            (40.0, 30.0, 600.0, 450.0)
        """
        return tuple(float(value) for value in self._box(width, height))

    def _box(self, width: int, height: int) -> tuple[Fraction, Fraction, Fraction, Fraction]:
        """:meth:`crop_box` in exact fractions (whole-image boxes have integer corners)."""
        if self.transform is None or self.crop_pct is None:
            return (Fraction(0), Fraction(0), Fraction(width), Fraction(height))
        _, crop_h, crop_w = self.input_size
        scale_h = Fraction(math.floor(crop_h / self.crop_pct), height)
        scale_w = Fraction(math.floor(crop_w / self.crop_pct), width)
        if self.crop_mode != "squash":  # one scale: the shorter side fills, or the longer fits
            scale_h = scale_w = (max if self.crop_mode == "center" else min)(scale_h, scale_w)
        box_w, box_h = crop_w / scale_w, crop_h / scale_h
        left, top = (width - box_w) / 2, (height - box_h) / 2
        return (left, top, left + box_w, top + box_h)

    def resize_mask(self, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """An object mask of the original image, mapped onto the model input.

        Nearest neighbour over the region :meth:`crop_box` keeps: input pixel ``(i, j)``
        takes the mask at row ``floor(top + i * box_h / H)`` and column
        ``floor(left + j * box_w / W)``, in exact arithmetic (pixels beyond the image, the
        padding of ``"border"`` mode, are False). This is the top-left-aligned neighbour of
        OpenCV's ``INTER_NEAREST`` and torch's ``mode="nearest"``; for a whole-image resize it
        is row ``i * h // H`` (OpenCV computes the same in floating point, so it picks the row
        before where ``i * h / H`` is a whole number that rounds down).

        Args:
            mask: (h, w) or (1, h, w) of the original image, bool or 0/1.

        Returns:
            (1, H, W) bool tensor at the model's input size.

        Raises:
            ValueError: For a mask that is not 2-D (or 1 x h x w).

        Example:
            >>> prep = Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 4, 4))
            >>> mask = torch.zeros(2, 8, dtype=torch.bool)
            >>> mask[:, :2] = True  # the left quarter
            >>> prep.resize_mask(mask)[0].int()
            tensor([[1, 0, 0, 0],
                    [1, 0, 0, 0],
                    [1, 0, 0, 0],
                    [1, 0, 0, 0]], dtype=torch.int32)
        """
        mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        if mask.dim() == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.dim() != 2:
            raise ValueError(f"mask must be (h, w) or (1, h, w), got shape {tuple(mask.shape)}")
        height, width = mask.shape
        left, top, right, bottom = self._box(width, height)
        _, out_h, out_w = self.input_size
        rows = _nearest_sources(top, bottom - top, out_h)
        cols = _nearest_sources(left, right - left, out_w)
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))
        picked = mask.bool().cpu()[rows.clamp(0, height - 1)][:, cols.clamp(0, width - 1)]
        return (picked & inside)[None]

    def class_name(self, index: int) -> str:
        """Name of class ``index`` (its number where names are unknown)."""
        if self.class_names is None or not 0 <= index < len(self.class_names):
            return str(index)
        return self.class_names[index]

    def class_index(self, name_or_index: str | int) -> int:
        """Class index from a number, a name or one synonym of a name (case-insensitive).

        ImageNet descriptions list synonyms: ``"tabby"`` finds ``"tabby, tabby cat"``.

        Raises:
            ValueError: For an unknown or ambiguous name (candidates listed, at most 10), or
                a number outside the known classes.
        """
        return class_index(name_or_index, self.class_names)


def _to_pil(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                "float images must be in [0, 1]; denormalise model inputs first "
                "(Preprocessing.denormalize) or pass uint8"
            )
        array = (array * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def _nearest_sources(start: Fraction, length: Fraction, count: int) -> torch.Tensor:
    """Source index ``floor(start + i * length / count)`` of each of ``count`` outputs."""
    return torch.tensor([math.floor(start + i * length / count) for i in range(count)])


def timm_preprocessing(
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_pct: float,
    crop_mode: str = "center",
    interpolation: str = "bilinear",
    class_names: Sequence[str] | None = None,
) -> Preprocessing:
    """timm's evaluation transform (resize, centre crop, normalise) as a :class:`Preprocessing`.

    Args:
        input_size: (C, H, W) of the model.
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation.
        crop_pct: Crop fraction; 1.0 with ``crop_mode="squash"`` resizes the whole image to
            (H, W) without cropping.
        crop_mode: One of :data:`CROP_MODES`.
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"``, ...
        class_names: Names of the classes, where known.

    Returns:
        The preprocessing, whose :meth:`~Preprocessing.crop_box` and
        :meth:`~Preprocessing.resize_mask` follow the same geometry.

    Example:
        >>> prep = timm_preprocessing((3, 224, 224), (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)
        >>> prep(Image.new("RGB", (640, 480))).shape, prep.crop_box(640, 480)
        (torch.Size([3, 224, 224]), (110.0, 30.0, 530.0, 450.0))
    """
    from timm.data import create_transform

    transform = create_transform(
        input_size=tuple(input_size),
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        mean=tuple(mean),
        std=tuple(std),
    )
    names = None if class_names is None else tuple(class_names)
    return Preprocessing(
        tuple(mean), tuple(std), tuple(input_size), names, transform, crop_pct, crop_mode
    )
