"""fashion-scenes: determinism, exact masks, disjoint background photos, shipped subset."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from class_space_saliency import _fashion_mnist as fashion_mnist
from class_space_saliency import scenes
from class_space_saliency.data import load_default_eval_uint8


def _have_fashion_mnist() -> bool:
    return any((d / "t10k-images-idx3-ubyte.gz").exists() for d in fashion_mnist.FASHION_MNIST_DIRS)


needs_fashion_mnist = pytest.mark.skipif(
    not _have_fashion_mnist(), reason="Debian's dataset-fashion-mnist package is not installed"
)


def test_train_and_test_backgrounds_come_from_disjoint_photos():
    assert set(scenes.photos("train")).isdisjoint(scenes.photos("test"))
    assert len(scenes.photos("train")) >= 4 and len(scenes.photos("test")) >= 2
    for name in (*scenes.TRAIN_PHOTOS, *scenes.TEST_PHOTOS):  # all bundled: no download
        photo = scenes._photo(name)
        assert photo.ndim == 3 and photo.shape[-1] == 3 and min(photo.shape[:2]) == 128
    with pytest.raises(ValueError, match="split"):
        scenes.photos("val")


def test_each_split_draws_only_its_own_photos(monkeypatch):
    drawn = []
    original = scenes._photo
    monkeypatch.setattr(scenes, "_photo", lambda name: drawn.append(name) or original(name))
    sprite = np.zeros((28, 28), np.uint8)
    sprite[5:20, 8:18] = 200
    for index in range(40):
        scenes.make_scene(sprite, 0, "test", index)
    assert set(drawn) <= set(scenes.TEST_PHOTOS) and len(set(drawn)) > 1
    drawn.clear()
    for index in range(40):
        scenes.make_scene(sprite, 0, "train", index)
    assert set(drawn) <= set(scenes.TRAIN_PHOTOS)


def test_mask_is_exactly_the_objects_pixels_on_a_hand_made_composite():
    sprite = np.zeros((28, 28), np.uint8)
    sprite[4:24, 6:22] = 255  # a solid block ...
    sprite[10, 12] = 0  # ... with a one-pixel hole (filled: smaller than HOLE_AREA)
    sprite[14:18, 12:16] = 0  # ... and a 4x4 hole (kept: background shows through)
    sprite[26, 2] = 30  # a faint pixel below the threshold (not object)
    black = np.zeros((32, 32, 3), np.float32)
    image, mask = scenes.composite(sprite, black, np.random.default_rng(3))
    # On a black backdrop, the object's pixels are exactly the non-black ones (colour >= 0.03).
    np.testing.assert_array_equal(mask, (image > 0).any(-1))
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    # One hole of roughly (4 * scale)^2 pixels survives; the one-pixel hole is filled.
    holes = ~box
    assert 0 < holes.sum() < box.size // 4
    # Coverage within the drawn range (the whole sprite counts: bounding box crop first).
    assert scenes.COVERAGE[0] - 0.05 <= mask.mean() <= scenes.COVERAGE[1] + 0.05


def test_object_mask_threshold_and_hole_filling():
    intensity = np.zeros((8, 8), np.float32)
    intensity[1:7, 1:7] = 0.9
    intensity[3, 3] = 0.0  # 1-px hole: filled
    intensity[0, 0] = scenes.MASK_THRESHOLD  # not above the threshold
    mask = scenes.object_mask(intensity)
    want = np.zeros((8, 8), bool)
    want[1:7, 1:7] = True
    np.testing.assert_array_equal(mask, want)


@needs_fashion_mnist
def test_generator_is_deterministic_and_independent_of_the_subset():
    a_images, a_masks, a_labels = scenes.generate("test", indices=[0, 5, 9], seed=1)
    b_images, b_masks, b_labels = scenes.generate("test", indices=[9, 5], seed=1)
    np.testing.assert_array_equal(a_images[[2, 1]], b_images)
    np.testing.assert_array_equal(a_masks[[2, 1]], b_masks)
    np.testing.assert_array_equal(a_labels[[2, 1]], b_labels)
    other, _, _ = scenes.generate("test", indices=[0, 5, 9], seed=2)
    assert not np.array_equal(a_images, other)
    assert a_images.shape == (3, 32, 32, 3) and a_images.dtype == np.uint8
    assert a_masks.dtype == bool


@needs_fashion_mnist
def test_shipped_subset_is_the_generators_output():
    images, labels, masks = load_default_eval_uint8(12, "fashion-scenes", masks=True)
    gen_images, gen_masks, gen_labels = scenes.generate("test", indices=range(12), seed=0)
    np.testing.assert_array_equal(labels, gen_labels)
    np.testing.assert_array_equal(masks[:, 0], gen_masks)
    assert np.abs(images.astype(int) - gen_images).max() <= 1  # resize rounding across builds


def test_training_variation_keeps_the_object_and_its_mask():
    rng = np.random.default_rng(0)
    backdrop = rng.uniform(size=(32, 32, 3)).astype(np.float32)
    varied = scenes.vary_background(backdrop, np.random.default_rng(1))
    assert varied.shape == backdrop.shape and varied.min() >= 0 and varied.max() <= 1
    field = scenes.smooth_field(np.random.default_rng(2))
    assert field.shape == (32, 32, 3) and np.abs(np.diff(field, axis=0)).max() < 0.5
    sprite = np.zeros((28, 28), np.uint8)
    sprite[6:22, 6:22] = 255
    for index in range(20):  # masks stay the object's pixels whatever the background
        scene = scenes.make_scene(sprite, 3, "train", index)
        interior = binary_erosion(scene.mask)  # edges are anti-aliased
        inside = scene.image[interior].astype(int)
        assert interior.sum() >= 16 and scene.label == 3
        assert (np.abs(inside - inside[0]) <= 1).all()  # one flat tint (intensity 1)
