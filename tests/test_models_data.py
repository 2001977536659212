"""The embedded model and evaluation subset: loading, preprocessing, accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from class_space_saliency.data import load_default_eval, load_default_eval_uint8, one_per_class
from class_space_saliency.models import (
    EMBEDDED_MODELS,
    Preprocessing,
    embedded_preprocessing,
    load_default,
    load_model,
)

# fashion-scenes: 79.60 % on 10,000 held-out-background test images, 80.6 % on the embedded
# 1,000: below the 85 % that the scenes issue asks for (see the README), asserted as measured.
MIN_ACCURACY = {"fashion-scenes": 0.79, "fashion": 0.88}
SIZES = {"fashion-scenes": 32, "fashion": 28}


@pytest.fixture(scope="module", params=list(EMBEDDED_MODELS))
def embedded(request):
    return request.param, *load_default(request.param)


@pytest.fixture(scope="module")
def default():
    return load_default("fashion")


def test_committed_models_accuracy_on_their_eval_subsets(embedded):
    name, model, prep = embedded
    assert not model.training
    images, labels = load_default_eval(dataset=name)
    size = SIZES[name]
    assert images.shape == (1000, 3, size, size) and labels.shape == (1000,)
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy >= MIN_ACCURACY[name]
    recorded = json.loads(EMBEDDED_MODELS[name].read_text())
    assert recorded["test_accuracy"] >= MIN_ACCURACY[name]  # on the full 10,000-image test set
    assert len(prep.class_names) == 10 and prep.input_size == (3, size, size)


def test_default_model_is_fashion_scenes_and_unknown_names_are_listed():
    model, prep = load_default()
    assert prep.input_size == (3, 32, 32) and model.patch_embed.grid_size == (8, 8)
    with pytest.raises(ValueError, match=r"fashion-scenes.*fashion"):
        load_default("imagenet")
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_default_eval(dataset="imagenet")


@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_eval_loaders_shapes_dtypes_and_normalisation(name):
    prep = embedded_preprocessing(name)
    size = SIZES[name]
    raw, labels = load_default_eval_uint8(5, dataset=name)
    raw3, labels3, raw_masks = load_default_eval_uint8(5, dataset=name, masks=True)
    images, labels2, masks = load_default_eval(5, dataset=name, masks=True)
    assert raw.dtype == np.uint8 and raw.shape == (5, size, size, 3)
    assert labels.dtype == np.int64 and labels.shape == (5,)
    assert raw_masks.dtype == bool and raw_masks.shape == (5, 1, size, size)
    assert masks.dtype == torch.bool and masks.shape == (5, 1, size, size)
    assert images.dtype == torch.float32 and labels2.dtype == torch.int64
    np.testing.assert_array_equal(raw, raw3)
    np.testing.assert_array_equal(labels, labels3)
    np.testing.assert_array_equal(masks.numpy(), raw_masks)
    assert 0.05 < masks.float().mean() < 0.7
    for c in range(3):  # plain-torch normalisation of the uint8 pixels
        want = (torch.from_numpy(raw[..., c]).float() / 255 - prep.mean[c]) / prep.std[c]
        torch.testing.assert_close(images[:, c], want)
    assert torch.equal(labels2, torch.from_numpy(labels))
    with pytest.raises(ValueError, match="n must be"):
        load_default_eval(0, dataset=name)


def test_fashion_masks_are_the_non_black_pixels():
    raw, _, masks = load_default_eval_uint8(20, dataset="fashion", masks=True)
    np.testing.assert_array_equal(masks[:, 0], raw[..., 0] > 0)


def test_one_per_class_picks_first_of_each():
    assert one_per_class(torch.tensor([2, 0, 2, 1, 0]), 3) == [1, 3, 0]


def test_preprocessing_accepts_pil_arrays_and_tensors(default):
    _, prep = default
    raw, _ = load_default_eval_uint8(1, dataset="fashion")
    want = load_default_eval(1, dataset="fashion")[0][0]
    grey = Image.fromarray(raw[0, ..., 0])
    torch.testing.assert_close(prep(grey), want)
    torch.testing.assert_close(prep(raw[0]), want)
    torch.testing.assert_close(
        prep(torch.from_numpy(raw[0, ..., 0]).float() / 255), want, atol=1e-5, rtol=0
    )
    big = prep(Image.fromarray(raw[0]).resize((280, 140)))
    assert big.shape == (3, 28, 28)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prep(np.full((28, 28), 3.0, dtype=np.float32))


def test_denormalize_inverts_normalize():
    prep = Preprocessing((0.5, 0.4, 0.3), (0.2, 0.3, 0.4), (3, 8, 8))
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(prep.denormalize(prep.normalize(x)), x)


def test_class_names_and_indices(default):
    _, prep = default
    assert prep.class_index("coat") == 4 and prep.class_index("7") == 7
    assert prep.class_name(9) == "Ankle boot"
    with pytest.raises(ValueError, match="unknown class name"):
        prep.class_index("hat")


def test_load_model_by_timm_name_with_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model, prep = load_model("vit_tiny_patch16_224", weights=path)
    assert torch.equal(model.head.weight, source.head.weight) and not model.training
    assert prep.input_size == (3, 224, 224) and prep.class_names[0].startswith("tench")
    tensor = prep(Image.new("RGB", (300, 200), (120, 30, 200)))
    assert tensor.shape == (3, 224, 224)


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="timm model name"):
        load_model("not_a_model_name")
    assert load_model("fashion")[1].input_size == (3, 28, 28)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth does not exist"):
        load_model("vit_tiny_patch16_224", weights=tmp_path / "missing.pth")
