"""The embedded model and evaluation subset: loading, preprocessing, accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from class_space_saliency.data import load_default_eval, load_default_eval_uint8, one_per_class
from class_space_saliency.models import DEFAULT_CONFIG, Preprocessing, load_default, load_model


@pytest.fixture(scope="module")
def default():
    return load_default()


def test_committed_model_accuracy_on_eval_subset(default):
    model, prep = default
    assert not model.training
    images, labels = load_default_eval()
    assert images.shape == (1000, 3, 28, 28) and labels.shape == (1000,)
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy >= 0.88
    recorded = json.loads(DEFAULT_CONFIG.read_text())
    assert recorded["test_accuracy"] >= 0.90  # on the full 10,000-image test set
    assert len(prep.class_names) == 10


def test_eval_subset_is_normalised_uint8_images(default):
    _, prep = default
    raw, labels = load_default_eval_uint8(5)
    images, labels2 = load_default_eval(5)
    assert raw.dtype == np.uint8 and raw.shape == (5, 28, 28)
    want = (torch.from_numpy(raw).float() / 255 - prep.mean[0]) / prep.std[0]
    torch.testing.assert_close(images[:, 1], want)
    assert torch.equal(labels2, torch.from_numpy(labels))
    with pytest.raises(ValueError, match="n must be"):
        load_default_eval(0)


def test_one_per_class_picks_first_of_each():
    assert one_per_class(torch.tensor([2, 0, 2, 1, 0]), 3) == [1, 3, 0]


def test_preprocessing_accepts_pil_arrays_and_tensors(default):
    _, prep = default
    raw, _ = load_default_eval_uint8(1)
    want = load_default_eval(1)[0][0]
    grey = Image.fromarray(raw[0])
    torch.testing.assert_close(prep(grey), want)
    torch.testing.assert_close(prep(np.repeat(raw[0][..., None], 3, -1)), want)
    torch.testing.assert_close(
        prep(torch.from_numpy(raw[0]).float() / 255), want, atol=1e-5, rtol=0
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
    with pytest.raises(FileNotFoundError):
        load_model("vit_tiny_patch16_224", weights=tmp_path / "missing.pth")
