"""The paper's data sets on tiny fake trees: ImageNet-S (selection, stimulus lists, R + 256 G
masks, categories) and CIFAR-100 (torchvision's pickles), masks on the token grid, and both
datasets in the benchmark runner."""

from __future__ import annotations

import csv
import os
import pickle
import random

import cv2
import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from class_space_saliency.classes import imagenet_synsets
from class_space_saliency.datasets import (
    CIFAR100,
    PAPER_EXCLUDED_SYNSETS,
    ImageNetS,
    UnreadableImageError,
    mask_to_tokens,
    open_dataset,
)
from class_space_saliency.evaluation import run_benchmark
from class_space_saliency.preprocessing import timm_preprocessing

TENCH, GOLDFISH, SHARK, TABBY = "n01440764", "n01443537", "n01484850", "n02123045"
BATHTUB, TOILET_TISSUE = "n02808440", "n15075141"  # merged in ImageNet-S: the paper drops them
IMAGES = {TENCH: 4, GOLDFISH: 3, SHARK: 2, TABBY: 5, BATHTUB: 3, TOILET_TISSUE: 3}
SIZES = [(50, 40), (61, 37), (40, 64), (33, 33), (48, 80)]  # (width, height)
# every ImageNet class but the merged-away ones, in no particular order (the old file's case)
CATEGORIES = [s for s in imagenet_synsets() if s not in {"n04356056", "n04493381", "n03642806"}]
random.Random(0).shuffle(CATEGORIES)


def segment_id(synset: str) -> int:
    """The ImageNet-S README: the id is the 1-based rank among the sorted categories."""
    return sorted(CATEGORIES).index(synset) + 1


def write_tree(base, categories_at="repo"):
    """ImageNet-S/ImageNetS919/{validation,validation-segmentation}; object = a box of the
    class's id, another box of another class (goldfish, or tench in goldfish images), 1000
    (ignored) in the top rows. Returns ``{(synset, name): annotation ids}``."""
    root = base / "ImageNet-S" / "ImageNetS919"
    generator = np.random.default_rng(0)
    annotations = {}
    for synset, count in IMAGES.items():
        for k in range(count):
            width, height = SIZES[k]
            name = f"ILSVRC2012_val_{1000 - k:08d}"  # names sort the other way round from k
            (root / "validation" / synset).mkdir(parents=True, exist_ok=True)
            (root / "validation-segmentation" / synset).mkdir(parents=True, exist_ok=True)
            pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "validation" / synset / f"{name}.JPEG")
            ids = np.zeros((height, width), np.int64)
            top, left = generator.integers(0, height // 2), generator.integers(0, width // 2)
            ids[top : top + height // 2, left : left + width // 3] = segment_id(synset)
            ids[-5:, -7:] = segment_id(TENCH if synset == GOLDFISH else GOLDFISH)
            ids[:2] = 1000
            png = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
            Image.fromarray(png).save(root / "validation-segmentation" / synset / f"{name}.png")
            annotations[(synset, name)] = ids
    categories = {
        "repo": base / "ImageNet-S" / "data" / "categories",
        "root": root,
    }.get(categories_at)
    if categories is not None:
        categories.mkdir(parents=True, exist_ok=True)
        (categories / "ImageNetS_categories_im919.txt").write_text("\n".join(CATEGORIES) + "\n")
    return root, annotations


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("imagenet_s"))


PREP = timm_preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0, crop_mode="squash")


def names(data):
    return [(s.synset, s.image.name) for s in data.stimuli]


def test_selection_is_the_first_images_per_class_without_the_excluded(tree):
    root, _ = tree
    data = ImageNetS(root.parent, PREP, per_class=3, masks=False)
    assert data.root == root
    first_three = [f"ILSVRC2012_val_{1000 - k:08d}.JPEG" for k in (4, 3, 2)]  # sorted by name
    want = [(TENCH, f"ILSVRC2012_val_{1000 - k:08d}.JPEG") for k in (3, 2, 1)]
    want += [(GOLDFISH, f"ILSVRC2012_val_{1000 - k:08d}.JPEG") for k in (2, 1, 0)]
    want += [(TABBY, n) for n in first_three]  # the shark, with 2 images, is skipped
    assert names(data) == want
    assert data.labels == [0] * 3 + [1] * 3 + [281] * 3
    assert [s.index for s in data.stimuli] == [0, 1, 2] * 3
    assert (
        set(PAPER_EXCLUDED_SYNSETS) >= {BATHTUB, TOILET_TISSUE}
        and len(PAPER_EXCLUDED_SYNSETS) == 10
    )
    everything = ImageNetS(root, PREP, per_class=None, exclude=(), masks=False)
    assert len(everything) == sum(IMAGES.values())
    assert sorted(set(everything.labels)) == [0, 1, 2, 281, 435, 999]


def test_items_are_the_preprocessed_image_its_label_and_the_mask_of_its_class(tree):
    root, annotations = tree
    data = ImageNetS(root, PREP, per_class=None)
    assert data.has_masks and len(data) == 14  # 20 images, 6 of the excluded classes
    for index, stimulus in enumerate(data.stimuli):
        image, label, mask = data[index]
        torch.testing.assert_close(image, PREP(Image.open(stimulus.image).convert("RGB")))
        assert label == imagenet_synsets().index(stimulus.synset)
        ids = annotations[(stimulus.synset, stimulus.image.stem)]
        height, width = ids.shape
        rows, cols = np.arange(32) * height // 32, np.arange(32) * width // 32  # nearest
        want = (ids == segment_id(stimulus.synset))[rows][:, cols]
        assert mask.shape == (1, 32, 32) and mask.dtype == torch.bool
        np.testing.assert_array_equal(mask[0].numpy(), want)
        assert want.any() and not want.all()
    # the other class's box and the ignored rows (1000) are not the object
    assert not data.object_mask(0)[:2].any()


def test_segmentation_decodes_r_plus_256_g(tree):
    root, annotations = tree
    data = ImageNetS(root, PREP, per_class=None)
    tabby = next(i for i, s in enumerate(data.stimuli) if s.synset == TABBY)
    stimulus = data.stimuli[tabby]
    ids = data.segmentation(tabby)
    np.testing.assert_array_equal(ids, annotations[(TABBY, stimulus.image.stem)])
    assert segment_id(TABBY) > 256 and segment_id(TENCH) == 1 and ids.max() == 1000


def test_batches_and_token_masks_for_the_analyses(tree):
    root, _ = tree
    data = ImageNetS(root, PREP, per_class=3)
    images, _, masks = next(iter(DataLoader(data, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
    tokens = mask_to_tokens(masks, (4, 4))
    share = masks.float().reshape(4, 1, 4, 8, 4, 8).mean((3, 5))  # 8 x 8 patches
    torch.testing.assert_close(tokens, share >= 0.5)


def test_the_stimulus_list_round_trips_in_the_official_format(tree, tmp_path):
    root, _ = tree
    data = ImageNetS(root, PREP, per_class=2, masks=False)
    path = data.write_stimuli(tmp_path / "validation_stim_info.csv")
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["imagenet_id", "index", "cat", "img_name", "img_index"]
    assert rows[0]["cat"].startswith("tench") and rows[-1]["index"] == "281"
    again = ImageNetS(root, PREP, stimuli=path, masks=False)
    assert again.stimuli == data.stimuli


def test_the_authors_list_is_read_from_the_root(tree, tmp_path):
    root, _ = tree
    with pytest.raises(FileNotFoundError, match=r"step 2\.2"):
        ImageNetS(root, PREP, stimuli="paper")
    listed = tmp_path / "list.csv"
    listed.write_text(f"imagenet_id,img_name\n{TABBY},ILSVRC2012_val_00001000.JPEG\n")
    data = ImageNetS(root, PREP, stimuli=listed)
    assert data.labels == [281] and data[0][2].any()
    listed.write_text(f"imagenet_id,index,img_name\n{TABBY},280,ILSVRC2012_val_00001000.JPEG\n")
    with pytest.raises(ValueError, match="index 280 is not the ImageNet-1k index"):
        ImageNetS(root, PREP, stimuli=listed)
    listed.write_text(f"imagenet_id,img_name\n{TABBY},missing.JPEG\n")
    with pytest.raises(FileNotFoundError, match="1 listed images missing"):
        ImageNetS(root, PREP, stimuli=listed)


def test_categories_are_found_or_named(tmp_path):
    root, _ = write_tree(tmp_path / "root_file", categories_at="root")
    assert ImageNetS(root, PREP)._segment_ids[TABBY] == segment_id(TABBY)
    bare, _ = write_tree(tmp_path / "none", categories_at=None)
    with pytest.raises(FileNotFoundError, match="pass categories="):
        ImageNetS(bare, PREP)
    listed = tmp_path / "categories.txt"
    listed.write_text("\n".join(CATEGORIES))
    assert ImageNetS(bare, PREP, categories=listed)._segment_ids[TABBY] == segment_id(TABBY)
    assert len(ImageNetS(bare, PREP, masks=False)) == 5  # no categories needed without masks


def test_bad_arguments_and_files_say_what_is_wrong(tree, tmp_path):
    root, _ = tree
    with pytest.raises(FileNotFoundError, match="image folder"):
        ImageNetS(tmp_path, PREP)
    with pytest.raises(TypeError, match="needs a Preprocessing"):
        ImageNetS(root, lambda image: image)
    with pytest.raises(ValueError, match="per_class"):
        ImageNetS(root, PREP, per_class=0)
    odd = tmp_path / "odd"
    (odd / "validation" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="'cats' is not an ImageNet-1k synset"):
        ImageNetS(odd, PREP, masks=False)


def test_an_unreadable_image_is_reported_and_skipped_by_the_benchmark(tmp_path):
    root, _ = write_tree(tmp_path)
    broken = sorted((root / "validation" / TABBY).iterdir())[0]
    broken.write_bytes(b"not a jpeg")
    data = ImageNetS(root, PREP, per_class=3)
    index = next(i for i, s in enumerate(data.stimuli) if s.image == broken)
    with pytest.raises(UnreadableImageError):
        data[index]
    fingerprint = data.fingerprint(len(data))
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    ).eval()
    report = run_benchmark(
        model, data, ["random"], ["vilas2023"], PREP.mean, PREP.std, tmp_path / "run",
        progress=False, n_boot=10,
    )  # fmt: skip
    assert report.n_images == len(data) - 1 and report.skipped[0]["skipped"] == str(broken)
    assert "localisation/pointing_game" in [section.name for section in report.sections]
    broken.write_bytes(b"another broken jpeg")
    assert data.fingerprint(len(data)) != fingerprint


@pytest.mark.parametrize(
    ("height", "width", "grid"), [(375, 500, 14), (375, 500, 7), (333, 500, 14)]
)
def test_nearest_tokens_of_an_input_mask_are_the_official_cv2_rule(height, width, grid):
    # src/vis.py: cv2.resize(annotation, (grid, grid), INTER_NEAREST); ImageNet's common sizes
    annotation = np.random.default_rng(2).random((height, width)) < 0.5
    prep = timm_preprocessing(
        (3, 224, 224), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0, crop_mode="squash"
    )
    official = cv2.resize(
        annotation.astype(np.uint8), (grid, grid), interpolation=cv2.INTER_NEAREST
    )
    tokens = mask_to_tokens(prep.resize_mask(annotation), (grid, grid), rule="nearest")
    np.testing.assert_array_equal(tokens[0].numpy(), official.astype(bool))


def test_share_tokens_count_the_pixels_of_every_patch():
    masks = torch.rand(2, 1, 30, 20, generator=torch.Generator().manual_seed(3)) < 0.5
    want = np.zeros((2, 1, 3, 4), bool)
    for i in range(3):
        for j in range(4):
            patch = masks[..., 10 * i : 10 * i + 10, 5 * j : 5 * j + 5].numpy()
            want[..., i, j] = patch.mean((-2, -1)) >= 0.7
    np.testing.assert_array_equal(mask_to_tokens(masks, (3, 4), threshold=0.7).numpy(), want)
    full = torch.ones(7, 9, dtype=torch.bool)  # a size that is not a multiple of the grid
    assert mask_to_tokens(full, (2, 2)).all() and not mask_to_tokens(~full, (2, 2)).any()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rule": "centre"}, "rule must be one of"),
        ({"threshold": 0.0}, "threshold"),
        ({"grid": (0, 2)}, "grid"),
        ({"grid": (9, 2)}, "grid"),
    ],
)
def test_mask_to_tokens_rejects_bad_arguments(options, message):
    arguments = {"grid": (2, 2), **options}
    with pytest.raises(ValueError, match=message):
        mask_to_tokens(torch.zeros(1, 8, 8, dtype=torch.bool), **arguments)


def write_cifar(base, n=40, classes=5, protocol=2):
    folder = base / "cifar-100-python"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(4)
    labels = generator.integers(0, classes, n).tolist()
    data = generator.integers(0, 256, (n, 3072), dtype=np.uint8)
    batch = {"data": data, "fine_labels": labels, "coarse_labels": [0] * n, "batch_label": "t"}
    meta = {"fine_label_names": [f"class{c}" for c in range(classes)], "coarse_label_names": ["x"]}
    for name, content in (("test", batch), ("train", batch), ("meta", meta)):
        with (folder / name).open("wb") as file:
            pickle.dump(content, file, protocol=protocol)
    return labels


CIFAR_PREP = timm_preprocessing(
    (3, 32, 32), (0.0,) * 3, (1.0,) * 3, crop_pct=1.0, crop_mode="squash"
)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_items_are_torchvisions_images_first_per_class(tmp_path, monkeypatch, protocol):
    labels = write_cifar(tmp_path, protocol=protocol)
    # torchvision checks the real files' MD5 sums; these are fakes
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *_: True)
    reference = torchvision.datasets.CIFAR100(tmp_path, train=False)
    data = CIFAR100(tmp_path, CIFAR_PREP, per_class=3)
    want = [i for c in range(5) for i in [k for k, label in enumerate(labels) if label == c][:3]]
    assert data.indices == want and data.labels == [labels[i] for i in want]
    assert data.class_names == tuple(reference.classes) and not data.has_masks
    for item, index in zip(range(len(data)), want, strict=True):
        image, label = data[item]
        pil, reference_label = reference[index]
        torch.testing.assert_close(image, torchvision.transforms.functional.to_tensor(pil))
        assert label == reference_label
    assert len(CIFAR100(tmp_path / "cifar-100-python", CIFAR_PREP, per_class=None)) == 40


def test_cifar_refuses_code_in_a_pickle_and_says_where_files_go(tmp_path):
    write_cifar(tmp_path)
    with (tmp_path / "cifar-100-python" / "test").open("wb") as file:
        pickle.dump({"data": os.system, "fine_labels": []}, file)
    with pytest.raises(ValueError, match=r"posix\.system is not allowed"):
        CIFAR100(tmp_path, CIFAR_PREP)
    with pytest.raises(FileNotFoundError, match=r"ROOT/cifar-100-python/\{train,test,meta\}"):
        CIFAR100(tmp_path / "elsewhere", CIFAR_PREP)
    with pytest.raises(ValueError, match="split must be one of"):
        CIFAR100(tmp_path, CIFAR_PREP, split="val")


def test_cifar_runs_in_the_benchmark(tmp_path):
    write_cifar(tmp_path)
    data = CIFAR100(tmp_path, CIFAR_PREP, per_class=2)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        num_classes=100,
    ).eval()  # fmt: skip
    report = run_benchmark(
        model, data, ["random"], ["vilas2023"], CIFAR_PREP.mean, CIFAR_PREP.std,
        tmp_path / "run", progress=False, n_boot=10,
    )  # fmt: skip
    assert report.n_images == 10
    assert not any(section.name.startswith("localisation") for section in report.sections)


def test_open_dataset_reads_name_colon_root(tmp_path, tree):
    write_cifar(tmp_path)
    assert len(open_dataset(f"cifar100:{tmp_path}", CIFAR_PREP, per_class=1)) == 5
    root, _ = tree
    assert open_dataset(f"imagenet-s:{root}", PREP, masks=False).labels == [281] * 5
    with pytest.raises(ValueError, match="NAME:ROOT"):
        open_dataset(str(tmp_path), PREP)
