"""Data sets of the paper: ImageNet-S (images, labels, object masks) and CIFAR-100.

Both are map-style ``torch`` datasets whose items are ``(normalised image, label[, mask])``
with ``has_masks``, ``labels`` and ``fingerprint(n)``: the benchmark runner, a
``DataLoader`` for the analyses and the command line take them as they are.
:func:`open_dataset` opens one from a ``"NAME:ROOT"`` string (a command-line ``--data``).

Example:
    >>> sorted(DATASETS)
    ['cifar100', 'imagenet-s']
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from .cifar import CIFAR100
from .files import UnreadableImageError
from .imagenet_s import IMAGENET_S_MERGED, PAPER_EXCLUDED_SYNSETS, ImageNetS, Stimulus
from .masks import TOKEN_RULES, mask_to_tokens

DATASETS: dict[str, type[Dataset]] = {"imagenet-s": ImageNetS, "cifar100": CIFAR100}
"""The readers by name, as :func:`open_dataset` takes them."""


def open_dataset(spec: str, preprocessing: Callable, **options) -> Dataset:
    """A dataset from ``"NAME:ROOT"``: ``imagenet-s:/data/ImageNet-S`` or ``cifar100:/data``.

    Args:
        spec: One of :data:`DATASETS`, a colon, and the dataset's root folder.
        preprocessing: The model's preprocessing.
        **options: Keyword options of the reader (``per_class``, ``stimuli``, ``masks``...).

    Raises:
        ValueError: For a spec without a known name.
    """
    name, separator, root = spec.partition(":")
    if not separator or name not in DATASETS or not root:
        raise ValueError(
            f"dataset must be NAME:ROOT with NAME one of {list(DATASETS)}, got {spec!r}"
        )
    return DATASETS[name](root, preprocessing, **options)


__all__ = [
    "CIFAR100",
    "DATASETS",
    "IMAGENET_S_MERGED",
    "PAPER_EXCLUDED_SYNSETS",
    "TOKEN_RULES",
    "ImageNetS",
    "Stimulus",
    "UnreadableImageError",
    "mask_to_tokens",
    "open_dataset",
]
