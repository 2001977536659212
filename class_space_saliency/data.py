"""Data: the embedded evaluation sets (fashion-scenes, fashion) and image files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .models import ASSETS, DEFAULT_MODEL, embedded_preprocessing
from .preprocessing import Preprocessing

#: The embedded evaluation sets: the first 1,000 test images of each, with labels (and masks).
EVAL_SETS = {
    "fashion-scenes": ASSETS / "fashion_scenes_eval1000.npz",
    "fashion": ASSETS / "fashion_mnist_eval1000.npz",
}


def load_default_eval_uint8(
    n: int | None = None, dataset: str = DEFAULT_MODEL, masks: bool = False
) -> tuple[np.ndarray, ...]:
    """The first ``n`` (default all 1,000) images of an embedded evaluation set, as uint8.

    Args:
        n: How many images (the first ``n`` of the 1,000); ``None`` for all.
        dataset: ``"fashion-scenes"`` (32x32 composites on held-out photos) or ``"fashion"``
            (28x28 Fashion-MNIST test images, grey replicated to RGB).
        masks: Also return the object masks: the composite's object pixels for
            fashion-scenes, the non-black pixels for fashion.

    Returns:
        ``(images uint8 (n, H, W, 3), labels int64 (n,))``, and bool masks (n, 1, H, W) with
        ``masks=True``.

    Example:
        >>> images, labels, masks = load_default_eval_uint8(4, masks=True)
        >>> images.shape, masks.shape
        ((4, 32, 32, 3), (4, 1, 32, 32))
    """
    if dataset not in EVAL_SETS:
        raise ValueError(f"dataset must be one of {list(EVAL_SETS)}, got {dataset!r}")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1000):
        raise ValueError(f"n must be an int in 1..1000 or None, got {n!r}")
    with np.load(EVAL_SETS[dataset]) as archive:
        images = archive["images"][:n]
        labels = archive["labels"][:n].astype(np.int64)
        if not masks:
            object_masks = None
        elif "masks" in archive:  # bit-packed along the width
            shape = (len(images), 1, *images.shape[1:3])
            object_masks = np.unpackbits(archive["masks"][:n], axis=-1, count=shape[-1])
            object_masks = object_masks.astype(bool).reshape(shape)
        else:  # plain Fashion-MNIST: the object is every non-black pixel
            object_masks = (images > 0)[:, None]
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    return (images, labels, object_masks) if masks else (images, labels)


def load_default_eval(
    n: int | None = None,
    dataset: str = DEFAULT_MODEL,
    masks: bool = False,
    preprocessing: Preprocessing | None = None,
) -> tuple[torch.Tensor, ...]:
    """An embedded evaluation set, ready for the embedded model of the same name.

    Args:
        n: How many images (the first ``n`` of the 1,000); ``None`` for all.
        dataset: ``"fashion-scenes"`` (default) or ``"fashion"``.
        masks: Also return the bool object masks at input resolution.
        preprocessing: Normalisation to apply; defaults to that of the embedded model
            ``dataset``.

    Returns:
        ``(images (n, 3, H, W) float, normalised; labels (n,) int64)``, and masks
        ``(n, 1, H, W)`` bool with ``masks=True``.

    Example:
        >>> images, labels = load_default_eval(8)
        >>> images.shape
        torch.Size([8, 3, 32, 32])
    """
    raw, labels, *object_masks = load_default_eval_uint8(n, dataset, masks=masks)
    if preprocessing is None:
        preprocessing = embedded_preprocessing(dataset)
    pixels = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div(255.0)
    tensors = (preprocessing.normalize(pixels), torch.from_numpy(labels))
    return (*tensors, *(torch.from_numpy(m) for m in object_masks))


def load_default_held_out(
    n: int,
    dataset: str = DEFAULT_MODEL,
    preprocessing: Preprocessing | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-split images ``1000 .. 1000 + n - 1`` of an embedded model's data set.

    Disjoint from the embedded evaluation set (test-split images 0..999) and never seen in
    the model's training: other objects from the same distribution, e.g. to fit linear probes
    whose test set is the evaluation set. fashion-scenes composites are generated (seed 0, the
    held-out photos); both need Debian's ``dataset-fashion-mnist`` package (the Fashion-MNIST
    test files).

    Args:
        n: How many images (1 .. 9,000).
        dataset: ``"fashion-scenes"`` or ``"fashion"``.
        preprocessing: Normalisation to apply (default: that of the embedded model).
        progress: Show a progress bar while composing fashion-scenes images.

    Returns:
        ``(images (n, 3, H, W) float, normalised; labels (n,) int64)``.

    Raises:
        ValueError: For an unknown ``dataset`` or ``n`` outside 1 .. 9,000.
        FileNotFoundError: Without the Fashion-MNIST test files.
    """
    from . import scenes
    from ._fashion_mnist import load_fashion_mnist

    if dataset not in EVAL_SETS:
        raise ValueError(f"dataset must be one of {list(EVAL_SETS)}, got {dataset!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 9000:
        raise ValueError(f"n must be an int in 1..9000, got {n!r}")
    indices = range(1000, 1000 + n)
    if dataset == "fashion-scenes":
        images, _, labels = scenes.generate("test", indices=indices, seed=0, progress=progress)
    else:
        sprites, all_labels = load_fashion_mnist("test")
        images = np.repeat(sprites[indices.start : indices.stop, ..., None], 3, axis=-1)
        labels = all_labels[indices.start : indices.stop]
    if preprocessing is None:
        preprocessing = embedded_preprocessing(dataset)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    return preprocessing.normalize(pixels), torch.from_numpy(np.asarray(labels, dtype=np.int64))


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
