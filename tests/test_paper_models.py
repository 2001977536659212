"""The paper's seven models: tags against timm's registry, the bare-name warning, checkpoints with
prefixed keys, and the official preprocessing against the processors the official code called."""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image
from timm.models import get_pretrained_cfg

from class_space_saliency import models
from class_space_saliency.classes import imagenet_class_names
from class_space_saliency.models import load_model, load_paper_model
from class_space_saliency.paper import (
    PAPER_MODELS,
    PAPER_RESULTS,
    paper_model_of_architecture,
    paper_results,
    paper_weights_warning,
)

FROM_TIMM = [m for m in PAPER_MODELS.values() if m.tag is not None]
TINY = "vit_tiny_patch16_224"  # stands in for ViT-B/16 where a checkpoint is written


def test_the_table_has_the_seven_models_of_the_official_code():
    assert list(PAPER_MODELS) == [
        "vit_b_32",
        "vit_b_16",
        "vit_large_16",
        "vit_miil_16",
        "vit_gap_16",
        "vit_cifar_16",
        "deit_ensemble_16",
    ]


@pytest.mark.parametrize("paper", FROM_TIMM, ids=lambda m: m.key)
def test_every_pinned_tag_is_in_timms_registry_with_the_papers_head(paper):
    assert paper.timm_name in timm.list_pretrained(paper.architecture + ".*")
    assert get_pretrained_cfg(paper.timm_name).num_classes == paper.num_classes == 1000


@pytest.mark.parametrize("paper", list(PAPER_MODELS.values()), ids=lambda m: m.key)
def test_every_architecture_builds_with_the_papers_head(paper):
    with torch.device("meta"):  # no memory, no weights
        model = timm.create_model(paper.architecture, num_classes=paper.num_classes)
    assert model.num_classes == paper.num_classes
    assert model.patch_embed.patch_size == ((32, 32) if paper.key == "vit_b_32" else (16, 16))


@pytest.mark.parametrize("paper", FROM_TIMM, ids=lambda m: m.key)
def test_the_warning_fires_exactly_when_the_bare_name_loads_other_weights(paper):
    with torch.device("meta"):
        loaded = timm.create_model(paper.architecture, pretrained=False).pretrained_cfg["tag"]
    warning = paper_weights_warning(paper.architecture)
    assert (warning is None) == (loaded == paper.tag)
    if warning is not None:
        assert paper.timm_name in warning and f"{paper.architecture}.{loaded}" in warning
    assert paper_weights_warning(paper.timm_name) is None  # an explicit tag is the user's choice


def test_the_two_bare_names_the_issue_names_warn_and_the_others_do_not():
    assert "augreg2_in21k_ft_in1k" in paper_weights_warning("vit_base_patch16_224")
    assert ".in21k," in paper_weights_warning("vit_base_patch16_224_miil")  # 11,221 classes
    for name in ("vit_base_patch32_224", "vit_large_patch16_224", "vit_base_patch16_rpn_224"):
        assert paper_weights_warning(name) is None
    assert paper_weights_warning("vit_small_patch16_224") is None  # not a paper architecture


@pytest.fixture
def fake_timm_download(monkeypatch):
    """``_timm_model`` without the network: a tiny ViT; records the names asked for."""
    asked = []

    def fake(name, state, num_classes, source=""):
        asked.append(name)
        return timm.create_model(TINY, num_classes=num_classes or 1000, depth=1)

    monkeypatch.setattr(models, "_timm_model", fake)
    return asked


def test_load_model_warns_for_a_bare_name_that_loads_other_weights(fake_timm_download):
    with pytest.warns(UserWarning, match=r"paper:vit_b_16.*vit_base_patch16_224\.augreg_in21k"):
        load_model("timm:vit_base_patch16_224")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model("vit_base_patch16_224.augreg_in21k_ft_in1k")
        load_model("vit_base_patch32_224")
    assert fake_timm_download == [
        "vit_base_patch16_224",
        "vit_base_patch16_224.augreg_in21k_ft_in1k",
        "vit_base_patch32_224",
    ]


def test_paper_names_load_the_pinned_tags_with_the_official_preprocessing(fake_timm_download):
    _, prep = load_model("paper:vit_b_16")
    assert fake_timm_download == ["vit_base_patch16_224.augreg_in21k_ft_in1k"]
    assert (prep.mean, prep.std, prep.crop_pct, prep.crop_mode) == (
        (0.5,) * 3,
        (0.5,) * 3,
        1.0,
        "squash",
    )
    assert prep.crop_box(500, 375) == (0.0, 0.0, 500.0, 375.0)  # no crop: masks keep all
    assert prep.class_names[0].startswith("tench")
    _, timm_prep = load_model("paper:vit_b_16", preprocessing="model")
    assert timm_prep.crop_pct == 0.9 and timm_prep.crop_mode == "center"  # timm's 248 + crop
    _, by_name = load_model("vit_base_patch32_224", preprocessing="paper")
    assert by_name.crop_pct == 1.0 and by_name.mean == (0.5,) * 3


def test_paper_preprocessing_is_refused_for_other_models():
    with pytest.raises(ValueError, match="not one of their timm architectures"):
        load_model("vit_small_patch16_224", preprocessing="paper")
    with pytest.raises(ValueError, match="not one of their timm architectures"):
        load_model("default", preprocessing="paper")
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        load_model("default", preprocessing="hf")
    with pytest.raises(ValueError, match=r"vit_b_32 \(ViT-B/32\)"):
        load_model("paper:vit_b32")


def tiny_with_prefixed_keys(prefix: str, num_classes: int = 100):
    model = timm.create_model(TINY, num_classes=num_classes).eval()
    return model, {prefix + key: value for key, value in model.state_dict().items()}


def outputs(model, seed=0):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("prefix", ["model.", "module.model.", "_orig_mod."])
def test_a_checkpoint_whose_keys_all_carry_a_wrapper_prefix_loads(tmp_path, prefix):
    # the CIFAR-100 checkpoint's keys start with 'model.'; the old load_model refused them
    original, state = tiny_with_prefixed_keys(prefix)
    torch.save(state, tmp_path / "cifar.pt")
    loaded, _ = load_model(TINY, weights=tmp_path / "cifar.pt", num_classes=100)
    torch.testing.assert_close(outputs(loaded), outputs(original))


def test_a_prefix_only_some_keys_carry_is_an_error(tmp_path):
    _, state = tiny_with_prefixed_keys("")
    state["model.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"1 unexpected keys \(e.g. model.extra\)"):
        load_model(TINY, weights=tmp_path / "mixed.pt")


def test_the_cifar_model_loads_its_prefixed_checkpoint(tmp_path):
    cifar = dataclasses.replace(PAPER_MODELS["vit_cifar_16"], architecture=TINY)
    original, state = tiny_with_prefixed_keys("model.")
    torch.save(state, tmp_path / "vit_base_patch16_224-CIFAR100.pt")
    loaded, prep = load_paper_model(cifar, weights=tmp_path / "vit_base_patch16_224-CIFAR100.pt")
    torch.testing.assert_close(outputs(loaded), outputs(original))
    assert loaded.num_classes == 100 and prep.class_names is None
    assert (prep.mean, prep.crop_pct, prep.crop_mode) == ((0.5,) * 3, 1.0, "squash")


def test_a_checkpoint_model_without_weights_says_where_they_come_from():
    with pytest.raises(ValueError, match=r"vit_base_patch16_224-CIFAR100\.pt"):
        load_model("paper:vit_cifar_16")
    with pytest.raises(ValueError, match="has 100 classes, but num_classes=10"):
        load_model("paper:vit_cifar_16", num_classes=10)


def refinement_checkpoint():
    """A DeiT-style checkpoint: weights under 'state_dict', plus refinement-head keys."""
    model = timm.create_model(TINY).eval()
    state = dict(model.state_dict())
    state["transformerheads.0.conv.weight"] = torch.zeros(3, 3)
    return model, {"state_dict": state, "epoch": 300}


def test_the_refinement_model_downloads_the_official_checkpoint(monkeypatch):
    original, checkpoint = refinement_checkpoint()
    urls = []

    def fake_download(url, map_location=None, weights_only=False):
        urls.append((url, map_location, weights_only))
        return checkpoint

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    refinement = dataclasses.replace(PAPER_MODELS["deit_ensemble_16"], architecture=TINY)
    loaded, prep = load_paper_model(refinement)
    assert urls == [(refinement.checkpoint_url, "cpu", True)]
    assert urls[0][0].endswith("/releases/download/v0/deit_base_trm.pth")
    torch.testing.assert_close(outputs(loaded), outputs(original))
    assert (prep.crop_pct, prep.crop_mode, prep.mean) == (0.875, "squash", (0.485, 0.456, 0.406))


def test_refinement_keys_other_than_its_heads_must_fit():
    _, checkpoint = refinement_checkpoint()
    checkpoint["state_dict"]["dist_token"] = torch.zeros(1, 1, 192)
    refinement = dataclasses.replace(PAPER_MODELS["deit_ensemble_16"], architecture=TINY)
    with pytest.raises(ValueError, match=r"1 unexpected keys \(e.g. dist_token\)"):
        load_paper_model(refinement, weights=checkpoint)


def test_a_checkpoint_with_python_objects_is_refused_with_a_way_out(tmp_path):
    _, state = tiny_with_prefixed_keys("")
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="weights_only=False"):
        load_model(TINY, weights=tmp_path / "a.pth")


def test_local_weights_of_a_timm_paper_model_load_offline():
    b32 = dataclasses.replace(PAPER_MODELS["vit_b_32"], architecture=TINY)
    original = timm.create_model(TINY).eval()
    loaded, prep = load_paper_model(b32, weights=original.state_dict())
    torch.testing.assert_close(outputs(loaded), outputs(original))
    assert prep.class_names[-1].startswith("toilet tissue")


def photo(width=500, height=375, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def hf_processor(name: str, **config):
    """The PIL-backed Hugging Face processor (transformers 5 names it ...Pil)."""
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, f"{name}Pil", getattr(transformers, name))(**config)


@pytest.mark.parametrize("key", ["vit_b_32", "vit_b_16", "vit_large_16", "vit_gap_16"])
def test_paper_preprocessing_is_the_hugging_face_in21k_processor(key):
    # google/vit-*-in21k's preprocessor_config: size 224, resample 2 (bilinear), mean = std = 0.5,
    # the ViTImageProcessor defaults
    image = photo()
    want = hf_processor("ViTImageProcessor")(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(PAPER_MODELS[key].preprocessing.build()(image), want)


def test_refinement_preprocessing_is_the_hugging_face_deit_processor():
    # facebook/deit-base-distilled-patch16-224's preprocessor_config: size 256, resample 3
    # (bicubic), centre crop 224, ImageNet mean and std
    processor = hf_processor(
        "DeiTImageProcessor",
        size={"height": 256, "width": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image = photo(333, 500)
    want = processor(image, return_tensors="pt")["pixel_values"][0]
    got = PAPER_MODELS["deit_ensemble_16"].preprocessing.build()(image)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cifar_preprocessing_is_the_official_torchvision_transform():
    official = T.Compose(
        [T.Resize((224, 224)), T.CenterCrop(224), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    )
    image = photo(32, 32)
    torch.testing.assert_close(
        PAPER_MODELS["vit_cifar_16"].preprocessing.build()(image), official(image)
    )


def test_miil_preprocessing_is_timms_config_of_the_pinned_weights():
    cfg = get_pretrained_cfg("vit_base_patch16_224_miil.in21k_ft_in1k")
    official = PAPER_MODELS["vit_miil_16"].preprocessing
    assert (official.mean, official.std, official.crop_pct) == (cfg.mean, cfg.std, cfg.crop_pct)
    assert (official.interpolation, official.crop_mode) == (cfg.interpolation, cfg.crop_mode)


def test_architecture_lookup_ignores_tags_and_skips_checkpoint_models():
    assert (
        paper_model_of_architecture("vit_base_patch16_224.augreg2_in21k_ft_in1k").key == "vit_b_16"
    )
    assert paper_model_of_architecture("vit_small_patch16_224") is None


def test_paper_results_are_unique_sourced_and_name_real_classes():
    keys = [(r.model, r.analysis, r.quantity) for r in PAPER_RESULTS]
    assert len(set(keys)) == len(keys)
    names = set(imagenet_class_names())
    for result in PAPER_RESULTS:
        assert result.model in PAPER_MODELS and result.source.startswith("notebooks/")
        if isinstance(result.value, tuple):  # the notebook prints LOC_synset_mapping names
            assert set(result.value) <= names, result
        else:
            assert isinstance(result.value, float)
    # every model has its identifiability and accuracy; ViT-B/32 its knock-outs and AUCs
    for key in PAPER_MODELS:
        quantities = {r.quantity for r in paper_results(key)}
        assert {"image_token_rate", "images_with_one", "accuracy"} <= quantities
    assert len(paper_results("vit_b_32", "vilas2023")) == 1 + 2 * 4
    with pytest.raises(ValueError, match="unknown paper model"):
        paper_results("vit_b_8")
