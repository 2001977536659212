"""Clear errors at the public surface: each names the argument and what was expected."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from class_space_saliency import ClassSpaceSaliency, ViTAnatomy, class_identifiability, testing
from class_space_saliency.testing import NUM_CLASSES, TIMM_TINY, tiny_images


@pytest.fixture(scope="module")
def explainer(shared_models):
    return ClassSpaceSaliency(shared_models.get(testing.tiny_vit, "plain"))


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        (torch.randn(3, 32, 32), ValueError, r"\(B, C, H, W\)"),
        (torch.randn(2, 1, 32, 32), ValueError, "3 channels"),
        (torch.randn(2, 3, 48, 48), ValueError, "spatial size"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
        (torch.empty(0, 3, 32, 32), ValueError, "empty"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(explainer, inputs, error, match):
    with pytest.raises(error, match=match):
        explainer.attribute(inputs, target=0)


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (NUM_CLASSES, ValueError, "out of range"),
        (-1, ValueError, "out of range"),
        ([1, 2], ValueError, "3 entries|2 entries"),
        (torch.tensor([0.5, 1.0, 2.0]), TypeError, "integer dtype"),
        ("cat", TypeError, "target"),
        ([1, 2.5, 3], TypeError, "ints"),
    ],
)
def test_bad_targets(explainer, target, error, match):
    with pytest.raises(error, match=match):
        explainer.attribute(tiny_images("plain"), target=target)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(layer=3), ValueError, "out of range"),
        (dict(layer=-4), ValueError, "out of range"),
        (dict(layer="last"), ValueError, "layer"),
        (dict(layer=[0, 1.5]), TypeError, "ints"),
        (dict(component="ffn"), ValueError, "component"),
        (dict(score="logprob"), ValueError, "score"),
        (dict(combine="max"), ValueError, "combine"),
        (dict(max_batch_size=0), ValueError, "max_batch_size"),
    ],
)
def test_bad_options(explainer, kwargs, error, match):
    with pytest.raises(error, match=match):
        explainer.attribute(tiny_images("plain"), target=0, **kwargs)


def test_negative_layer_indices_work(explainer):
    images = tiny_images("plain")
    torch.testing.assert_close(
        explainer.attribute(images, 1, layer=-3), explainer.attribute(images, 1, layer=0)
    )


def test_constructor_validates_options(tiny_vit):
    model = tiny_vit("plain")
    with pytest.raises(ValueError, match="component"):
        ClassSpaceSaliency(model, component="residuals")
    with pytest.raises(ValueError, match="score"):
        ClassSpaceSaliency(model, score="prob")


def test_unsupported_models():
    with pytest.raises(TypeError, match="cannot find the ViT anatomy"):
        ClassSpaceSaliency(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ClassSpaceSaliency(lambda x: x)
    with pytest.raises(TypeError, match="attention head"):
        ClassSpaceSaliency(
            timm.create_model("vit_tiny_patch16_224", global_pool="map", **TIMM_TINY)
        )
    headless = dict(TIMM_TINY, num_classes=0)
    with pytest.raises(TypeError, match="no classifier head"):
        ClassSpaceSaliency(timm.create_model("vit_tiny_patch16_224", **headless))


def test_identifiability_validates_inputs(tiny_vit):
    model = tiny_vit("plain")
    with pytest.raises(ValueError, match="component"):
        class_identifiability(model, tiny_images("plain"), 0, component="x")
    with pytest.raises(ValueError, match="out of range"):
        class_identifiability(model, tiny_images("plain"), [0, 1, 99])


class TinyCustomViT(nn.Module):
    """A ViT whose parts carry other names: described to the library by hand."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.embed, self.layers, self.final, self.classifier = (
            base.patch_embed,
            base.blocks,
            base.norm,
            base.head,
        )
        self.cls, self.pos = base.cls_token, base.pos_embed
        self.base = [base]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.classifier(self.final(self.layers(x))[:, 0])


def test_custom_model_overrides_match_the_timm_original(tiny_vit):
    custom = TinyCustomViT(tiny_vit("plain")).eval()
    explainer = ClassSpaceSaliency(
        custom,
        blocks=custom.layers,
        norm=custom.final,
        head=custom.classifier,
        num_prefix_tokens=1,
        patch_size=8,
        img_size=32,
    )
    images = tiny_images("plain")
    want = ClassSpaceSaliency(custom.base[0], component="mlp").attribute(images, 3)
    torch.testing.assert_close(explainer.attribute(images, 3, component="mlp"), want)
    anatomy = ViTAnatomy.from_model(
        custom,
        blocks=custom.layers,
        norm=custom.final,
        head=custom.classifier,
        num_prefix_tokens=1,
        patch_size=8,
    )
    assert anatomy.img_size is None and anatomy.grid_size((16, 24)) == (2, 3)
