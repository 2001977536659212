"""Evaluation datasets: an ImageFolder layout with the model's preprocessing, tensor pairs.

Items are ``(normalised image (C, H, W), label)``, or ``(image, label, mask (1, H, W) bool)``
for a dataset whose ``has_masks`` attribute is True (the benchmark then also scores
localisation). An image file that cannot be read raises :class:`UnreadableImageError` from
``__getitem__``; the benchmark runner catches it, records the file as skipped (listed in the
report) and goes on. ``fingerprint(n)`` hashes what the first ``n`` items hold, so a resumed
run can tell a changed dataset from the one it started on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from ..datasets.files import UnreadableImageError, files_fingerprint, open_image

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/<file>``, classes numbered in sorted folder-name order.

    Args:
        root: The folder with one sub-folder per class.
        transform: The model's preprocessing, RGB PIL image -> normalised (C, H, W) tensor.
        class_to_idx: Folder name -> label; default: sorted folder names numbered from 0.

    Raises:
        FileNotFoundError: If ``root`` does not exist or holds no images.

    Example:
        >>> from PIL import Image
        >>> from class_space_saliency.models import load_model
        >>> for name in ("cat", "dog"):
        ...     Path("val", name).mkdir(parents=True)
        ...     Image.new("RGB", (40, 30)).save(f"val/{name}/0.png")
        >>> model, preprocessing = load_model("default")
        >>> data = ImageFolderDataset("val/", preprocessing)
        >>> image, label = data[1]
        >>> image.shape, label, data.class_to_idx
        (torch.Size([3, 32, 32]), 1, {'cat': 0, 'dog': 1})
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

    has_masks = False

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self, n: int) -> str:
        """SHA-256 (16 hex digits) of the first ``n`` files' bytes, names and labels."""
        return files_fingerprint(
            (f"{path.relative_to(self.root)}:{label}", [path]) for path, label in self.samples[:n]
        )

    @property
    def labels(self) -> list[int]:
        """The label of every item, without reading the images."""
        return [label for _, label in self.samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """The preprocessed image and label; ``UnreadableImageError`` for a broken file."""
        path, label = self.samples[index]
        return self.transform(open_image(path)), label


def match_class_folders(
    folders: Sequence[str], class_names: Sequence[str] | None, by_index: bool = False
) -> dict[str, int]:
    """Label of each class folder: its class in the model's class names.

    A folder matches a class by name or synonym, case-insensitively, with ``_`` read as a
    space (``tabby_cat``); ImageNet WordNet-id folders (``n02123045``) match a 1000-class
    model's classes through timm's ImageNet info.

    Args:
        folders: Names of the class folders.
        class_names: The model's class names (``None`` where unknown).
        by_index: Number the folders in sorted name order instead (no matching).

    Returns:
        ``{folder: class index}``.

    Raises:
        ValueError: For folders that match no class (at most 10 are named), or unknown
            class names without ``by_index``.
    """
    from ..classes import MAX_CANDIDATES, class_index, imagenet_synsets

    folders = sorted(folders)
    if by_index:
        if class_names is not None and len(folders) > len(class_names):
            raise ValueError(
                f"{len(folders)} class folders but the model has {len(class_names)} classes"
            )
        return {name: i for i, name in enumerate(folders)}
    if class_names is None:
        raise ValueError(
            "the model's class names are unknown, so class folders cannot be matched to its "
            "classes; give class names (--class-names FILE) or number the folders in sorted "
            "order (--labels-by-index)"
        )
    synsets = imagenet_synsets() if len(class_names) == 1000 else ()
    matched, unmatched = {}, []
    for folder in folders:
        if folder in synsets:
            matched[folder] = synsets.index(folder)
            continue
        for query in dict.fromkeys((folder, folder.replace("_", " "))):
            try:
                matched[folder] = class_index(query, class_names)
                break
            except ValueError:
                continue
        else:
            unmatched.append(folder)
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} of {len(folders)} class folders match none of the model's "
            f"{len(class_names)} class names: {unmatched[:MAX_CANDIDATES]}; rename them, give "
            "--class-names FILE, or number folders in sorted order with --labels-by-index"
        )
    return matched


def balanced_order(labels: Sequence[int], seed: int = 0) -> list[int]:
    """A seeded order of the items that takes the classes in turn.

    Each class's items are shuffled (seeded); the order then takes one item of each class
    in turn, so every prefix is a class-balanced sample, and a longer prefix extends a
    shorter one (a run can grow).

    Example:
        >>> balanced_order([0, 0, 0, 1], seed=0)
        [2, 3, 0, 1]
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    queues = []
    for label in labels.unique().tolist():
        members = torch.nonzero(labels == label).flatten()
        queues.append(members[torch.randperm(len(members), generator=generator)].tolist())
    order = []
    for turn in range(max((len(q) for q in queues), default=0)):
        order.extend(q[turn] for q in queues if turn < len(q))
    return order


def _update(digest: hashlib._Hash, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


class TensorPairDataset(Dataset):
    """``(images (n, C, H, W), labels (n,)[, masks (n, 1, H, W) bool])`` as a dataset.

    Items are ``(image, label)``, or ``(image, label, mask)`` when masks are given
    (``has_masks`` is then True).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        masks: torch.Tensor | None = None,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"expected images (n, C, H, W) and labels (n,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if masks is not None:
            wanted = (images.shape[0], 1, *images.shape[-2:])
            if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
                raise TypeError(f"masks must be a bool tensor {wanted}, got {masks!r:.60}")
            if tuple(masks.shape) != wanted:
                raise ValueError(f"masks must have shape {wanted}, got {tuple(masks.shape)}")
        self.images, self.labels, self.masks = images, labels, masks

    @property
    def has_masks(self) -> bool:
        """Whether items carry a mask."""
        return self.masks is not None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple:
        if self.masks is None:
            return self.images[index], int(self.labels[index])
        return self.images[index], int(self.labels[index]), self.masks[index]

    def fingerprint(self, n: int) -> str:
        """SHA-256 (16 hex digits) of the first ``n`` images, labels and masks."""
        digest = hashlib.sha256()
        for tensor in (self.images, self.labels, self.masks):
            if tensor is not None:
                _update(digest, tensor[:n])
        return digest.hexdigest()[:16]


def has_masks(dataset: Dataset) -> bool:
    """Whether the items of ``dataset`` (or of the dataset a ``Subset`` takes) carry masks."""
    if isinstance(dataset, Subset):
        return has_masks(dataset.dataset)
    return bool(getattr(dataset, "has_masks", False))


def dataset_fingerprint(dataset: Dataset, n: int) -> str:
    """A hash of the first ``n`` items: the dataset's ``fingerprint(n)`` where it has one.

    A ``Subset`` hashes its indices and the whole dataset it takes from; other datasets are
    read item by item (images, labels, masks; an unreadable item contributes its path and
    reason).
    """
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset, len(dataset.dataset))
        indices = torch.as_tensor(list(dataset.indices[:n]), dtype=torch.long)
        digest = hashlib.sha256(inner.encode())
        _update(digest, indices)
        return digest.hexdigest()[:16]
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint(n)
    digest = hashlib.sha256()
    for index in range(n):
        try:
            item = dataset[index]
        except UnreadableImageError as error:
            digest.update(f"unreadable:{error.path}:{error.reason};".encode())
            continue
        for part in item:
            _update(digest, torch.as_tensor(part))
    return digest.hexdigest()[:16]


def as_dataset(data: Dataset | tuple[torch.Tensor, ...]) -> Dataset:
    """A dataset: ``data`` itself, or an ``(images, labels[, masks])`` tuple wrapped."""
    if isinstance(data, tuple | list):
        if len(data) not in (2, 3):
            raise ValueError(
                f"expected an (images, labels) or (images, labels, masks) tuple, "
                f"got {len(data)} items"
            )
        return TensorPairDataset(*data)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            f"dataset must be a sized Dataset or (images, labels[, masks]), got {type(data)}"
        )
    return data
