"""Preprocessing: how a model wants its images (size, crop, normalisation, class names).

Kept apart from :mod:`.models` (which re-exports :class:`Preprocessing`) so that the model
loaders (:mod:`.models`, :mod:`.hub`) and the data readers share it without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .classes import class_index


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its images: size, normalisation and class names.

    Calling it turns a PIL image, a uint8/float array or a [0, 1] tensor into the model's
    normalised (C, H, W) float tensor. Without a ``transform``, images are converted to the
    model's channel count (grey replicated to RGB, RGB averaged to grey) and resized to the
    input size (bilinear, whole image, no crop).

    Attributes:
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation.
        input_size: (C, H, W) the model expects.
        class_names: Names of the classes, where known.
        transform: Optional PIL -> tensor transform (timm's eval transform) used instead.
        crop_pct: With ``transform``: timm's centre-crop fraction (the shorter side is
            resized to ``H / crop_pct``, then the centre (H, W) is cropped); ``None`` for a
            transform that keeps the whole image.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None
    transform: Callable | None = None
    crop_pct: float | None = None

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
        the model sees after preprocessing (the whole image unless a centre crop is used).

        Example:
            >>> prep = Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 224, 224),
            ...                      transform=lambda image: image, crop_pct=0.875)  # timm's
            >>> prep.crop_box(640, 480)  # shorter side to 256, then the centre 224 x 224
            (110.0, 30.0, 530.0, 450.0)
        """
        if self.transform is None or self.crop_pct is None:
            return (0.0, 0.0, float(width), float(height))
        _, crop_h, crop_w = self.input_size
        scale = math.floor(min(crop_h, crop_w) / self.crop_pct) / min(width, height)
        box_w, box_h = crop_w / scale, crop_h / scale
        left, top = (width - box_w) / 2, (height - box_h) / 2
        return (left, top, left + box_w, top + box_h)

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
