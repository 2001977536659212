"""ImageNet-S: ImageNet validation images with pixel masks of their class (Gao et al., 2022).

The paper's analyses use ImageNet-S919 (https://github.com/LUSSeg/ImageNet-S): 12,419
validation images of 919 ImageNet classes with semantic masks. The layout its preparation
script writes, and the official code reads::

    ImageNet-S/                          # a clone of LUSSeg/ImageNet-S (optional)
      data/categories/ImageNetS_categories_im919.txt
      ImageNetS919/                      # root (or pass its parent)
        validation/<synset>/<name>.JPEG
        validation-segmentation/<synset>/<name>.png
        validation_stim_info.csv         # the authors' stimulus list (optional)

A segmentation PNG stores class ids as ``R + 256 * G`` (0: other, 1000: ignored); the id of a
synset is its 1-based rank among the sorted ImageNet-S categories. ImageNet-S merges five pairs
of ImageNet classes (:data:`IMAGENET_S_MERGED`): the pixels of both carry one id, so the
paper leaves all ten out (:data:`PAPER_EXCLUDED_SYNSETS`). Labels are ImageNet-1k indices
(the standard order of ``LOC_synset_mapping.txt``, from timm; the file is not needed).
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..classes import imagenet_class_names, imagenet_synsets
from ..preprocessing import Preprocessing
from .files import files_fingerprint, open_image

IMAGENET_S_MERGED = {
    "n04356056": "n04355933",  # sunglasses -> sunglass
    "n04493381": "n02808440",  # tub -> bathtub
    "n03642806": "n03832673",  # laptop -> notebook
    "n04008634": "n03773504",  # projectile -> missile
    "n03887697": "n15075141",  # paper towel -> toilet tissue
}
"""ImageNet classes that ImageNet-S labels as another class (its README)."""

PAPER_EXCLUDED_SYNSETS = tuple(itertools.chain.from_iterable(IMAGENET_S_MERGED.items()))
"""The ten synsets the official code excludes (``CATS_EXCLUDE``): both sides of every merge."""

CATEGORIES_FILE = "ImageNetS_categories_im919.txt"
NUM_CATEGORIES = 919
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
STIMULI_COLUMNS = ("imagenet_id", "index", "cat", "img_name", "img_index")
"""Columns of the official stimulus list (``{split}_stim_info.csv``)."""


@dataclass(frozen=True)
class Stimulus:
    """One image of the dataset.

    Attributes:
        synset: WordNet id of its class (the folder name).
        label: ImageNet-1k class index.
        image: The image file.
        index: Its position among the stimuli of its class (the official ``img_index``).
    """

    synset: str
    label: int
    image: Path
    index: int


class ImageNetS(Dataset):
    """ImageNet-S images with labels and the mask of their class, for analyses and benchmark.

    Items are ``(normalised image (C, H, W), ImageNet-1k label)``, and with ``masks=True`` a
    third, the bool mask (1, H, W) of the label's object, mapped onto the model input by
    nearest neighbour over the region the preprocessing keeps
    (:meth:`~class_space_saliency.preprocessing.Preprocessing.resize_mask`); on the token
    grid it is :func:`~class_space_saliency.datasets.mask_to_tokens`. An unreadable image or
    PNG raises :class:`~class_space_saliency.datasets.UnreadableImageError` (the benchmark
    skips it).

    Args:
        root: The ``ImageNetS919`` folder, or the folder holding it.
        preprocessing: The model's :class:`~class_space_saliency.preprocessing.Preprocessing`
            (any PIL -> tensor callable without masks).
        split: Image folder under the root (masks in ``{split}-segmentation``).
        stimuli: Which images: ``None`` selects by ``per_class`` and ``exclude``;
            ``"paper"`` reads the authors' list ``{root}/{split}_stim_info.csv`` (the official
            README, step 2.2); a path reads a list in that format (columns ``imagenet_id``,
            ``img_name``; ``index`` is checked where present).
        per_class: With ``stimuli=None``: the first ``per_class`` images of each class in
            file-name order, skipping classes with fewer (the official rule, which took them
            in directory order: the authors' list pins their set); ``None`` takes all.
        exclude: With ``stimuli=None``: synsets left out (default: the paper's ten).
        masks: Return object masks (needs the segmentation folder and the categories).
        categories: The ImageNet-S categories file; default: ``ImageNetS_categories_im919.txt``
            in the root, ``root/data/categories`` or the ImageNet-S clone around the root,
            else the split's class folders when there are all 919.

    Raises:
        FileNotFoundError: For a missing folder, stimulus list, listed image, segmentation or
            categories file.
        ValueError: For a folder or listed synset that is not an ImageNet-1k class, a listed
            ``index`` that is not its ImageNet-1k index, or bad ``per_class``.
        TypeError: For ``masks=True`` with a preprocessing that cannot map masks.

    Example:
        >>> from class_space_saliency.models import load_model
        >>> model, prep = load_model("paper:vit_b_32")  # doctest: +SKIP
        >>> data = ImageNetS("ImageNet-S", prep, stimuli="paper")  # doctest: +SKIP
        >>> image, label, mask = data[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        preprocessing: Preprocessing | Callable,
        *,
        split: str = "validation",
        stimuli: str | Path | None = None,
        per_class: int | None = 5,
        exclude: Sequence[str] = PAPER_EXCLUDED_SYNSETS,
        masks: bool = True,
        categories: str | Path | None = None,
    ) -> None:
        root = Path(root)
        self.root = root / "ImageNetS919" if (root / "ImageNetS919").is_dir() else root
        self.images_dir = self.root / split
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"ImageNet-S image folder {self.images_dir} does not exist")
        if masks and not hasattr(preprocessing, "resize_mask"):
            raise TypeError(
                "masks=True needs a Preprocessing (it maps masks onto the input), got "
                f"{type(preprocessing).__name__}"
            )
        if per_class is not None and (isinstance(per_class, bool) or per_class < 1):
            raise ValueError(f"per_class must be a positive int or None, got {per_class!r}")
        self.preprocessing = preprocessing
        self.split = split
        self.masks = bool(masks)
        if stimuli is None:
            self.stimuli = self._select(per_class, frozenset(exclude))
        else:
            listed = self.root / f"{split}_stim_info.csv" if stimuli == "paper" else Path(stimuli)
            self.stimuli = self._read_stimuli(listed)
        if not self.stimuli:
            raise FileNotFoundError(f"no images selected from {self.images_dir}")
        self.segmentation_dir = self.root / f"{split}-segmentation"
        self._segment_ids: dict[str, int] = {}
        if self.masks:
            _require_files([self.segmentation_file(i) for i in range(len(self.stimuli))], "masks")
            self._segment_ids = self._read_categories(categories)

    @property
    def has_masks(self) -> bool:
        """Whether items carry a mask."""
        return self.masks

    def __len__(self) -> int:
        return len(self.stimuli)

    @property
    def labels(self) -> list[int]:
        """The ImageNet-1k label of every item, without reading the images."""
        return [stimulus.label for stimulus in self.stimuli]

    def __getitem__(self, index: int) -> tuple:
        """``(image, label)``, and the object mask (1, H, W) with ``masks=True``."""
        stimulus = self.stimuli[index]
        image = self.preprocessing(open_image(stimulus.image))
        if not self.masks:
            return image, stimulus.label
        return image, stimulus.label, self.preprocessing.resize_mask(self.object_mask(index))

    def segmentation_file(self, index: int) -> Path:
        """The segmentation PNG of item ``index``."""
        stimulus = self.stimuli[index]
        return self.segmentation_dir / stimulus.synset / f"{stimulus.image.stem}.png"

    def segmentation(self, index: int) -> np.ndarray:
        """ImageNet-S class ids (h, w) of item ``index`` at the annotation's resolution."""
        pixels = np.asarray(open_image(self.segmentation_file(index)), dtype=np.int64)
        return pixels[..., 0] + 256 * pixels[..., 1]

    def object_mask(self, index: int) -> np.ndarray:
        """Bool mask (h, w) of the pixels of the item's own class."""
        if not self.masks:
            raise ValueError("this dataset was opened with masks=False")
        synset = self.stimuli[index].synset
        return self.segmentation(index) == self._segment_ids[synset]

    def fingerprint(self, n: int) -> str:
        """SHA-256 (16 hex digits) of the first ``n`` items' names, labels and file bytes."""
        return files_fingerprint(
            (
                f"{s.synset}/{s.image.name}:{s.label}",
                [s.image, self.segmentation_file(i)] if self.masks else [s.image],
            )
            for i, s in enumerate(self.stimuli[:n])
        )

    def write_stimuli(self, path: str | Path) -> Path:
        """Save the selected images as a stimulus list in the official CSV format.

        ``ImageNetS(root, prep, stimuli=path)`` reads it back: the same images, in order.
        """
        names = imagenet_class_names()
        path = Path(path)
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(STIMULI_COLUMNS)
            for s in self.stimuli:
                writer.writerow([s.synset, s.label, names[s.label], s.image.name, s.index])
        return path

    def _select(self, per_class: int | None, exclude: frozenset[str]) -> tuple[Stimulus, ...]:
        selected = []
        for folder in sorted(p for p in self.images_dir.iterdir() if p.is_dir()):
            if folder.name in exclude:
                continue
            label = _imagenet_index(folder.name, f"folder {folder}")
            files = sorted(
                p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if per_class is not None:
                files = files[:per_class] if len(files) >= per_class else []
            selected.extend(Stimulus(folder.name, label, f, i) for i, f in enumerate(files))
        return tuple(selected)

    def _read_stimuli(self, path: Path) -> tuple[Stimulus, ...]:
        if not path.is_file():
            raise FileNotFoundError(
                f"stimulus list {path} does not exist (the authors' list: the official README, "
                "step 2.2, into ImageNetS919/; or stimuli=None to select by rule)"
            )
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        if not rows:
            raise ValueError(f"stimulus list {path} lists no images")
        missing = {"imagenet_id", "img_name"} - set(rows[0])
        if missing:
            raise ValueError(f"stimulus list {path} lacks the column(s) {sorted(missing)}")
        counts: dict[str, int] = {}
        stimuli = []
        for line, row in enumerate(rows, start=2):
            synset = row["imagenet_id"]
            label = _imagenet_index(synset, f"{path}:{line}")
            if row.get("index") not in (None, "") and int(row["index"]) != label:
                raise ValueError(
                    f"{path}:{line}: index {row['index']} is not the ImageNet-1k index of "
                    f"{synset} ({label})"
                )
            counts[synset] = counts.get(synset, 0) + 1
            listed = row.get("img_index")
            position = int(listed) if listed not in (None, "") else counts[synset] - 1
            stimuli.append(
                Stimulus(synset, label, self.images_dir / synset / row["img_name"], position)
            )
        _require_files([s.image for s in stimuli], "listed images")
        return tuple(stimuli)

    def _read_categories(self, categories: str | Path | None) -> dict[str, int]:
        """Synset -> ImageNet-S class id: 1 + its rank among the sorted categories."""
        if categories is not None:
            found = [Path(categories)]
            if not found[0].is_file():
                raise FileNotFoundError(f"categories file {categories} does not exist")
        else:
            candidates = (
                self.root / CATEGORIES_FILE,
                self.root / "data" / "categories" / CATEGORIES_FILE,
                self.root.parent / "data" / "categories" / CATEGORIES_FILE,
            )
            found = [path for path in candidates if path.is_file()]
        if found:
            synsets = [line.strip() for line in found[0].read_text().splitlines() if line.strip()]
        else:
            synsets = [p.name for p in self.images_dir.iterdir() if p.is_dir()]
            if len(synsets) != NUM_CATEGORIES:
                raise FileNotFoundError(
                    f"no {CATEGORIES_FILE} in {self.root}, its data/categories or "
                    f"{self.root.parent / 'data' / 'categories'}, and {self.images_dir} has "
                    f"{len(synsets)} class folders, not all {NUM_CATEGORIES}: pass categories= "
                    "(the file is in data/categories/ of the ImageNet-S repository)"
                )
        ids = {synset: rank + 1 for rank, synset in enumerate(sorted(set(synsets)))}
        unknown = sorted({s.synset for s in self.stimuli} - set(ids))
        if unknown:
            raise ValueError(f"{len(unknown)} classes have no ImageNet-S id: {unknown[:10]}")
        return ids


def _imagenet_index(synset: str, where: str) -> int:
    """ImageNet-1k index of ``synset``; ValueError naming ``where`` for another name."""
    synsets = imagenet_synsets()
    if synset not in synsets:
        raise ValueError(f"{where}: {synset!r} is not an ImageNet-1k synset (n########)")
    return synsets.index(synset)


def _require_files(paths: Sequence[Path], what: str) -> None:
    """FileNotFoundError naming up to three of ``paths`` that do not exist."""
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} missing, e.g. {', '.join(missing[:3])}")
