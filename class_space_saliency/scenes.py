"""fashion-scenes: Fashion-MNIST objects composited on crops of natural photos, with exact masks.

Every image is generated deterministically from ``(seed, split, index)``, so any subset can be
regenerated alone, in any order, on any machine:

- **object**: the Fashion-MNIST image ``index`` of the split, cropped to its bounding box (pixels
  > 0), scaled (bilinear, anti-aliased, scikit-image) so that its own pixels cover a uniformly
  drawn 15-50 % of the canvas (less where the scaled object would not fit), placed at a uniformly
  random position, and tinted with a random colour: pixel = colour x (0.3 + 0.7 x intensity).
- **mask**: the object's pixels, i.e. the scaled intensity ``> MASK_THRESHOLD`` (0.2 of the
  [0, 1] range), with holes smaller than ``HOLE_AREA`` (4) pixels filled
  (``skimage.morphology.remove_small_holes``). The composite takes exactly the masked pixels
  from the object and every other pixel from the background, so the mask is exact.
- **background**: a random square crop (side 15-100 % of the photo's shorter side, random
  position, random horizontal flip) of one of the photos bundled with scikit-image, resized to
  the canvas. Train and test use disjoint photos (``TRAIN_PHOTOS``, ``TEST_PHOTOS``), so a
  model is evaluated on backgrounds it never saw. Training backgrounds are further varied
  (``vary_background``: rotation by a multiple of 90 degrees, a random permutation of the colour
  channels, inversion with probability 0.3, a random colour cast: per-channel gains in
  0.4-1.2), and with probability ``SMOOTH_FIELD_P`` (0.3) a
  training background is a random smooth colour field instead (``smooth_field``), so 8 photos
  do not teach a model their textures; test backgrounds are plain photo crops. All photos are
  public domain or CC0 (see ``assets/LICENSE-scenes-photos.txt``).

Example:
    >>> images, masks, labels = generate("test", indices=range(4), seed=0)
    >>> images.shape, images.dtype, masks.shape, masks.dtype
    ((4, 32, 32, 3), dtype('uint8'), (4, 32, 32), dtype('bool'))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from ._fashion_mnist import load_fashion_mnist

CANVAS = 32
MASK_THRESHOLD = 0.2
HOLE_AREA = 4
COVERAGE = (0.15, 0.5)
CROP_SCALE = (0.15, 1.0)
PHOTO_SIDE = 128
SPLIT_CODES = {"train": 0, "test": 1}
SMOOTH_FIELD_P = 0.3

#: scikit-image photos used as training backgrounds (public domain / CC0).
TRAIN_PHOTOS = (
    "astronaut",
    "camera",
    "brick",
    "grass",
    "hubble_deep_field",
    "coins",
    "text",
    "clock",
)
#: Photos used only for test backgrounds, never in training (CC0 / public domain).
TEST_PHOTOS = ("chelsea", "coffee", "rocket", "gravel")


@dataclass(frozen=True)
class Scene:
    """One composite: uint8 image (H, W, 3), bool mask (H, W) and int label."""

    image: np.ndarray
    mask: np.ndarray
    label: int


@cache
def _photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as float RGB in [0, 1], shorter side ``PHOTO_SIDE`` px."""
    import skimage.data
    from skimage.color import gray2rgb
    from skimage.transform import rescale
    from skimage.util import img_as_float32

    image = img_as_float32(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = gray2rgb(image)
    scale = PHOTO_SIDE / min(image.shape[:2])
    return rescale(image, scale, channel_axis=-1, anti_aliasing=True).astype(np.float32)


def photos(split: str) -> tuple[str, ...]:
    """Names of the scikit-image photos that give the backgrounds of ``split``."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return TRAIN_PHOTOS if split == "train" else TEST_PHOTOS


def object_mask(intensity: np.ndarray) -> np.ndarray:
    """The object's pixels: ``intensity > MASK_THRESHOLD``, holes < ``HOLE_AREA`` px filled."""
    from skimage.morphology import remove_small_holes

    return remove_small_holes(intensity > MASK_THRESHOLD, max_size=HOLE_AREA - 1)


def background(photo: np.ndarray, rng: np.random.Generator, canvas: int = CANVAS) -> np.ndarray:
    """A random square crop (random scale, position and flip) of ``photo``, resized to canvas."""
    from skimage.transform import resize

    height, width = photo.shape[:2]
    side = max(2, round(rng.uniform(*CROP_SCALE) * min(height, width)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return resize(crop, (canvas, canvas), anti_aliasing=side > canvas).astype(np.float32)


def smooth_field(rng: np.random.Generator, canvas: int = CANVAS) -> np.ndarray:
    """Random colours on a 2x2 to 6x6 grid, upsampled bilinearly to the canvas (training only)."""
    from skimage.transform import resize

    cells = int(rng.integers(2, 7))
    colours = rng.uniform(0.0, 1.0, size=(cells, cells, 3)).astype(np.float32)
    return resize(colours, (canvas, canvas), order=1).astype(np.float32)


def vary_background(backdrop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training-split variation: rotate by k x 90 degrees, permute channels, maybe invert, cast."""
    varied = np.rot90(backdrop, k=int(rng.integers(4)))[..., rng.permutation(3)]
    if rng.random() < 0.3:
        varied = 1.0 - varied
    gains = rng.uniform(0.4, 1.2, size=3).astype(np.float32)
    return np.ascontiguousarray(np.clip(varied * gains, 0.0, 1.0))


def composite(
    sprite: np.ndarray, backdrop: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Scale, tint and place a Fashion-MNIST ``sprite`` (uint8 28x28) on ``backdrop``.

    Args:
        sprite: The object, uint8 (h, w), black background.
        backdrop: Float RGB (H, W, 3) in [0, 1].
        rng: Draws coverage, position and colour.

    Returns:
        ``(uint8 image (H, W, 3), bool mask (H, W))``.
    """
    from skimage.transform import resize

    canvas_h, canvas_w = backdrop.shape[:2]
    rows, cols = np.nonzero(sprite)
    if len(rows):
        sprite = sprite[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    intensity = sprite.astype(np.float32) / 255.0
    object_pixels = max(1, int((intensity > MASK_THRESHOLD).sum()))
    coverage = rng.uniform(*COVERAGE)
    scale = np.sqrt(coverage * canvas_h * canvas_w / object_pixels)
    scale = min(scale, canvas_h / sprite.shape[0], canvas_w / sprite.shape[1])
    size = (max(1, round(sprite.shape[0] * scale)), max(1, round(sprite.shape[1] * scale)))
    scaled = np.clip(resize(intensity, size, order=1, anti_aliasing=scale < 1), 0.0, 1.0)
    local_mask = object_mask(scaled)
    top = int(rng.integers(0, canvas_h - size[0] + 1))
    left = int(rng.integers(0, canvas_w - size[1] + 1))
    colour = rng.uniform(0.1, 1.0, size=3).astype(np.float32)
    image = backdrop.copy()
    mask = np.zeros((canvas_h, canvas_w), dtype=bool)
    mask[top : top + size[0], left : left + size[1]] = local_mask
    shaded = colour * (0.3 + 0.7 * scaled[..., None])
    window = image[top : top + size[0], left : left + size[1]]
    window[local_mask] = shaded[local_mask]
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8), mask


def make_scene(
    sprite: np.ndarray,
    label: int,
    split: str,
    index: int,
    seed: int = 0,
    photo_names: Sequence[str] | None = None,
) -> Scene:
    """The composite number ``index`` of ``split`` for ``seed`` (deterministic)."""
    rng = np.random.default_rng((seed, SPLIT_CODES[split], index))
    names = photos(split) if photo_names is None else tuple(photo_names)
    photo = _photo(names[int(rng.integers(len(names)))])
    backdrop = background(photo, rng)
    if split == "train":
        backdrop = vary_background(backdrop, rng)
        if rng.random() < SMOOTH_FIELD_P:
            backdrop = smooth_field(rng)
    image, mask = composite(sprite, backdrop, rng)
    return Scene(image, mask, int(label))


def generate(
    split: str,
    indices: Iterable[int] | None = None,
    seed: int = 0,
    root: str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate fashion-scenes images of a split.

    Args:
        split: ``"train"`` (60,000 objects, ``TRAIN_PHOTOS``) or ``"test"`` (10,000 objects,
            ``TEST_PHOTOS``).
        indices: Which Fashion-MNIST objects of the split (default all); image ``i`` is the
            same whichever other indices are asked for.
        seed: Seed of the composition; the training script draws a new seed per epoch.
        root: Folder of the Fashion-MNIST IDX files (default: Debian's package).
        progress: Show a progress bar.

    Returns:
        ``(images uint8 (N, 32, 32, 3), masks bool (N, 32, 32), labels int64 (N,))``.
    """
    from tqdm.auto import tqdm

    sprites, labels = load_fashion_mnist(split, root)
    chosen = np.arange(len(sprites)) if indices is None else np.asarray(list(indices), dtype=int)
    images = np.empty((len(chosen), CANVAS, CANVAS, 3), dtype=np.uint8)
    masks = np.empty((len(chosen), CANVAS, CANVAS), dtype=bool)
    for row, index in enumerate(tqdm(chosen, desc=f"fashion-scenes {split}", disable=not progress)):
        scene = make_scene(sprites[index], labels[index], split, int(index), seed)
        images[row], masks[row] = scene.image, scene.mask
    return images, masks, labels[chosen].astype(np.int64)
