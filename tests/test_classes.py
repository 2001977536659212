"""Class names and own checkpoints: synonyms, short errors, num_classes from the head."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from class_space_saliency.classes import class_index, imagenet_class_names, read_class_names
from class_space_saliency.evaluation.datasets import match_class_folders
from class_space_saliency.methods import ClassSpaceSaliency, create_method
from class_space_saliency.models import load_model

PETS = [f"breed {k}" for k in range(36)] + ["Tabby"]


def test_imagenet_names_by_any_synonym_case_insensitive():
    names = imagenet_class_names()
    assert names[281] == "tabby, tabby cat"
    assert class_index("tabby", names) == 281
    assert class_index("Tabby Cat", names) == 281
    assert class_index("TABBY, tabby cat", names) == 281
    assert class_index("281", names) == 281


def test_ambiguous_and_unknown_names_give_short_errors():
    names = imagenet_class_names()
    with pytest.raises(ValueError, match="ambiguous") as ambiguous:
        class_index("crane", names)  # a bird (134) and a machine (517)
    assert "134" in str(ambiguous.value) and "517" in str(ambiguous.value)
    for query in ("cat", "dog", "xyzzy"):
        with pytest.raises(ValueError, match="unknown class name") as unknown:
            class_index(query, names)
        message = str(unknown.value)
        assert len(message) < 400 and message.count(",") <= 2 * 10  # at most 10 candidates
    with pytest.raises(ValueError, match="out of range"):
        class_index(1000, names)


def test_explainer_takes_targets_by_name(tiny_vit):
    model = tiny_vit("plain")
    names = [f"class {k}" for k in range(6)] + ["Coat"]
    images = torch.randn(2, 3, 32, 32)
    explainer = ClassSpaceSaliency(model, class_names=names)
    by_name = explainer.attribute(images, target="coat")
    torch.testing.assert_close(by_name, explainer.attribute(images, target=6))
    listed = create_method("gradcam", model, class_names=names).attribute(images, ["Coat", 0])
    expected = create_method("gradcam", model).attribute(images, [6, 0])
    torch.testing.assert_close(listed, expected)
    with pytest.raises(TypeError, match="class_names"):
        ClassSpaceSaliency(model).attribute(images, target="Coat")


@pytest.fixture(scope="module")
def pets_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pets")
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=37)
    torch.save({"state_dict": source.state_dict()}, folder / "pets.pth")
    (folder / "pets.txt").write_text("\n".join(PETS) + "\n")
    return source, folder


def test_load_model_infers_classes_from_the_checkpoint_head(pets_checkpoint):
    source, folder = pets_checkpoint
    model, prep = load_model(
        "vit_tiny_patch16_224", weights=folder / "pets.pth", class_names=folder / "pets.txt"
    )
    assert model.head.weight.shape == (37, 192) and prep.class_names == tuple(PETS)
    torch.testing.assert_close(model.head.weight, source.head.weight)
    assert prep.class_index("tabby") == 36
    model, prep = load_model("vit_tiny_patch16_224", weights=folder / "pets.pth")
    assert model.num_classes == 37 and prep.class_names is None
    with pytest.raises(ValueError, match="37 classes, but num_classes=10"):
        load_model("vit_tiny_patch16_224", weights=folder / "pets.pth", num_classes=10)
    with pytest.raises(ValueError, match="2 class names given"):
        load_model("vit_tiny_patch16_224", weights=folder / "pets.pth", class_names=["a", "b"])
    with pytest.raises(ValueError, match="do not fit") as mismatch:
        load_model("vit_small_patch16_224", weights=folder / "pets.pth")
    assert len(str(mismatch.value)) < 600


def test_read_class_names_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "twice.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="no names"):
        read_class_names(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="repeats"):
        read_class_names(tmp_path / "twice.txt")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist"):
        read_class_names(tmp_path / "missing.txt")


def test_crop_box_is_the_region_timm_preprocessing_keeps(pets_checkpoint):
    _, folder = pets_checkpoint
    _, prep = load_model("vit_tiny_patch16_224", weights=folder / "pets.pth")
    width, height = 400, 300
    ramp = np.zeros((height, width, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, width)[None, :]  # red encodes x
    ramp[..., 1] = np.linspace(0, 255, height)[:, None]  # green encodes y
    seen = prep.denormalize(prep(Image.fromarray(ramp))).clamp(0, 1) * 255
    left, top, right, bottom = prep.crop_box(width, height)
    pixel_x, pixel_y = 255 / (width - 1), 255 / (height - 1)
    assert abs(seen[0, :, 0].mean() - left * pixel_x) < 2 * pixel_x
    assert abs(seen[0, :, -1].mean() - (right - 1) * pixel_x) < 2 * pixel_x
    assert abs(seen[1, 0, :].mean() - top * pixel_y) < 2 * pixel_y
    assert abs(seen[1, -1, :].mean() - (bottom - 1) * pixel_y) < 2 * pixel_y


def test_class_folders_match_model_classes():
    names = imagenet_class_names()
    folders = ["n02123045", "Egyptian_cat", "goldfish"]
    assert match_class_folders(folders, names) == {"n02123045": 281, "Egyptian_cat": 285,
                                                   "goldfish": 1}  # fmt: skip
    with pytest.raises(ValueError, match=r"1 of 2 class folders match none.*\['kitten'\]"):
        match_class_folders(["kitten", "goldfish"], names)
    with pytest.raises(ValueError, match="--labels-by-index"):
        match_class_folders(["a", "b"], None)
    assert match_class_folders(["b", "a"], None, by_index=True) == {"a": 0, "b": 1}
