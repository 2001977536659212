"""Reader for the Fashion-MNIST IDX files (Zalando Research, MIT licence)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (possibly gzipped) IDX file into a uint8 array.

    Args:
        path: Path of an ``*-ubyte`` or ``*-ubyte.gz`` file.

    Returns:
        The array with the shape stored in the file's header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split as uint8 images (N, 28, 28) and int64 labels (N,).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: Folder with the IDX files; defaults to where Debian's
            ``dataset-fashion-mnist`` package installs them.

    Returns:
        ``(images, labels)``.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    roots = (Path(root),) if root is not None else FASHION_MNIST_DIRS
    for folder in roots:
        images = folder / f"{prefix}-images-idx3-ubyte.gz"
        labels = folder / f"{prefix}-labels-idx1-ubyte.gz"
        if images.exists() and labels.exists():
            return read_idx(images), read_idx(labels).astype(np.int64)
    raise FileNotFoundError(
        f"Fashion-MNIST files not found in {[str(r) for r in roots]}; install Debian's "
        "'dataset-fashion-mnist' package or pass root= to a folder with the IDX .gz files"
    )
