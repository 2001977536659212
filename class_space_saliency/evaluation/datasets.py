"""Evaluation datasets: an ImageFolder layout with the model's preprocessing, tensor pairs.

Items are ``(normalised image (C, H, W), label)``. An image file that cannot be read raises
:class:`UnreadableImageError` from ``__getitem__``; the benchmark runner catches it, records
the file as skipped (listed in the report) and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


class UnreadableImageError(Exception):
    """An image file of the dataset could not be decoded.

    Attributes:
        path: The file.
        reason: What went wrong.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/<file>``, classes numbered in sorted folder-name order.

    Args:
        root: The folder with one sub-folder per class.
        transform: The model's preprocessing, RGB PIL image -> normalised (C, H, W) tensor.
        class_to_idx: Folder name -> label; default: sorted folder names numbered from 0.

    Raises:
        FileNotFoundError: If ``root`` does not exist or holds no images.

    Example:
        >>> model, preprocessing = load_model("default")
        >>> data = ImageFolderDataset("val/", preprocessing)
        >>> image, label = data[0]
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], torch.Tensor],
        class_to_idx: dict[str, int] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.class_to_idx = class_to_idx or {name: i for i, name in enumerate(folders)}
        self.samples: list[tuple[Path, int]] = [
            (path, self.class_to_idx[folder])
            for folder in folders
            if folder in self.class_to_idx
            for path in sorted((self.root / folder).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders of {self.root}"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """The preprocessed image and label; ``UnreadableImageError`` for a broken file."""
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UnreadableImageError(path, f"{type(error).__name__}: {error}") from error
        return self.transform(rgb), label


class TensorPairDataset(Dataset):
    """``(images (n, C, H, W), labels (n,))`` as a dataset of ``(image, label)`` items."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"expected images (n, C, H, W) and labels (n,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def as_dataset(data: Dataset | tuple[torch.Tensor, torch.Tensor]) -> Dataset:
    """A dataset of ``(image, label)``: ``data`` itself, or a tensor pair wrapped."""
    if isinstance(data, tuple | list):
        if len(data) != 2:
            raise ValueError(f"expected an (images, labels) pair, got {len(data)} items")
        return TensorPairDataset(*data)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(f"dataset must be a sized Dataset or (images, labels), got {type(data)}")
    return data
