"""Data: the embedded Fashion-MNIST evaluation subset and image files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .models import ASSETS, Preprocessing

EVAL_SUBSET = ASSETS / "fashion_mnist_eval1000.npz"


def load_default_eval_uint8(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (default all 1,000) Fashion-MNIST test images as uint8 (n, 28, 28)."""
    with np.load(EVAL_SUBSET) as archive:
        images, labels = archive["images"], archive["labels"].astype(np.int64)
    if n is not None:
        if not isinstance(n, int) or not 1 <= n <= len(images):
            raise ValueError(f"n must be an int in 1..{len(images)} or None, got {n!r}")
        images, labels = images[:n], labels[:n]
    return images, labels


def load_default_eval(
    n: int | None = None, preprocessing: Preprocessing | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded evaluation subset, ready for the default model.

    Args:
        n: How many images (the first ``n`` of the 1,000); ``None`` for all.
        preprocessing: Normalisation to apply; defaults to the embedded model's.

    Returns:
        ``(images (n, 3, 28, 28) float, normalised; labels (n,) int64)``.

    Example:
        >>> images, labels = load_default_eval(8)
        >>> images.shape
        torch.Size([8, 3, 28, 28])
    """
    if preprocessing is None:
        import json

        from .models import DEFAULT_CONFIG

        config = json.loads(DEFAULT_CONFIG.read_text())
        preprocessing = Preprocessing(
            tuple(config["mean"]), tuple(config["std"]), tuple(config["input_size"])
        )
    images, labels = load_default_eval_uint8(n)
    pixels = torch.from_numpy(images).float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return preprocessing.normalize(pixels), torch.from_numpy(labels)


def one_per_class(labels: torch.Tensor | np.ndarray, num_classes: int) -> list[int]:
    """Index of the first example of each class, in class order (classes absent are skipped)."""
    labels = np.asarray(labels)
    return [int(np.flatnonzero(labels == c)[0]) for c in range(num_classes) if (labels == c).any()]


def load_image(path: str | Path) -> Image.Image:
    """Open an image file (PNG, JPEG, ...; RGB, grey or with alpha) as an RGB PIL image.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File name endings that :func:`expand_image_paths` takes from folders."""


def expand_image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by the image files under them (sorted, recursive).

    Args:
        paths: Image files and/or folders.

    Returns:
        The paths, in the given order, with each folder expanded in place.

    Raises:
        ValueError: For a folder that holds no image files.
    """
    expanded: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise ValueError(
                    f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
                )
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded
