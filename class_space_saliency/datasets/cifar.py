"""CIFAR-100 from torchvision's folder layout, offline, as the paper's CIFAR-100 model reads it.

The layout (``torchvision.datasets.CIFAR100(root, download=True)`` writes it, or unpack
``cifar-100-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html)::

    root/cifar-100-python/{train,test,meta}      # Python pickles

The official code (``src/datasets/cifar.py``) takes the first five test images of each class
in file order; :class:`CIFAR100` does the same with ``per_class=5``.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .files import files_fingerprint

FOLDER = "cifar-100-python"
SPLITS = ("train", "test")


class CIFAR100(Dataset):
    """CIFAR-100 images (32 x 32 RGB) with their fine labels (100 classes).

    Items are ``(normalised image (C, H, W), label)``; ``has_masks`` is False.

    Args:
        root: The folder holding ``cifar-100-python/`` (torchvision's root), or that folder.
        preprocessing: PIL image -> normalised tensor (the model's ``Preprocessing``).
        split: ``"test"`` (the paper's) or ``"train"``.
        per_class: The first ``per_class`` images of each class in file order (the official
            code's 5); ``None`` for all. Items are ordered class by class.

    Raises:
        FileNotFoundError: For a missing folder or file.
        ValueError: For an unknown split, bad ``per_class``, or a file that is not a CIFAR-100
            pickle (only NumPy arrays and plain Python values are unpickled).

    Example:
        >>> data = CIFAR100("cifar/", prep, per_class=5)  # doctest: +SKIP
        >>> len(data), data.class_names[:2]  # doctest: +SKIP
        (500, ('apple', 'aquarium_fish'))
    """

    has_masks = False

    def __init__(
        self,
        root: str | Path,
        preprocessing: Callable[[Image.Image], object],
        *,
        split: str = "test",
        per_class: int | None = 5,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if per_class is not None and (isinstance(per_class, bool) or per_class < 1):
            raise ValueError(f"per_class must be a positive int or None, got {per_class!r}")
        root = Path(root)
        self.folder = root / FOLDER if (root / FOLDER).is_dir() else root
        self.file = self.folder / split
        batch = _load(self.file, ("data", "fine_labels"))
        self.class_names = tuple(
            _load(self.folder / "meta", ("fine_label_names",))["fine_label_names"]
        )
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["fine_labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(
                f"{self.file} holds data {data.shape} and {len(labels)} labels; expected "
                "(n, 3072) uint8 rows and n labels"
            )
        self.indices = [
            int(i)
            for label in range(len(self.class_names))
            for i in np.flatnonzero(labels == label)[:per_class]
        ]
        self.images = data[self.indices].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self._labels = labels[self.indices]
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> list[int]:
        """The label of every item."""
        return self._labels.tolist()

    def __getitem__(self, index: int) -> tuple:
        """``(image, label)``."""
        return self.preprocessing(Image.fromarray(self.images[index])), int(self._labels[index])

    def fingerprint(self, n: int) -> str:
        """SHA-256 (16 hex digits) of the split file and the first ``n`` items' indices."""
        return files_fingerprint([(f"{self.file.name}:{self.indices[:n]}", [self.file])])


_NUMPY_GLOBALS = {
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol 2 pickles written by Python 3
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,  # protocol 5
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and plain values only (a pickle can run any code)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-100 file")
        return _NUMPY_GLOBALS[(module, name)]


def _load(path: Path, keys: tuple[str, ...]) -> dict:
    """A CIFAR pickle (Python 2 strings decoded as latin-1) that holds ``keys``."""
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-100 file {path} does not exist (expected torchvision's layout "
            f"ROOT/{FOLDER}/{{train,test,meta}})"
        )
    try:
        with path.open("rb") as file:
            content = _ArrayUnpickler(file, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a CIFAR-100 pickle: {error}") from error
    if not isinstance(content, dict) or not set(keys) <= set(content):
        raise ValueError(f"{path} is not a CIFAR-100 pickle: expected a dict with {keys}")
    return content
