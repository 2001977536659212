"""Options declared once: constructor, per-call overrides, validation, old names deprecated."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import timm
import torch
from torch import nn

from class_space_saliency import (
    AttentionRollout,
    ClassSpaceAttentionGradient,
    ClassSpaceSaliency,
    GradCAM,
    RandomSaliency,
)
from class_space_saliency.methods import ClassSpaceOptions, list_methods
from class_space_saliency.testing import build_method

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, **options).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def reference_logit_map(model: nn.Module, images: torch.Tensor, block: int, target: int):
    """Plain torch: the target logit of head(norm(x)) for the image tokens after ``block``."""
    outputs = []
    handle = model.blocks[block].register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        model(images)
        handle.remove()
        logits = model.head(model.norm(outputs[0][:, 1:]))
    return logits[..., target].reshape(len(images), 1, 4, 4)


# ---------------------------------------------------------------------------- per-call overrides
def test_per_call_options_override_without_changing_the_explainer(model, images):
    explainer = ClassSpaceSaliency(model)
    before = explainer.options
    got = explainer.attribute(images, target=2, layer=0)
    torch.testing.assert_close(got, reference_logit_map(model, images, 0, 2))
    assert explainer.options is before and explainer.layer == [2]
    torch.testing.assert_close(
        explainer.attribute(images, target=2), reference_logit_map(model, images, 2, 2)
    )


def test_positional_options_keep_working(model, images):
    keyword = ClassSpaceSaliency(model, layer=1, component="mlp").attribute(images, 3)
    positional = ClassSpaceSaliency(model, 1, "mlp").attribute(images, 3)
    per_call = ClassSpaceSaliency(model).attribute(images, 3, 1, component="mlp")
    assert torch.equal(keyword, positional) and torch.equal(keyword, per_call)
    with pytest.raises(TypeError, match="multiple values"):
        ClassSpaceSaliency(model, 1, layer=2)
    with pytest.raises(TypeError, match="at most 6 positional"):
        ClassSpaceSaliency(model).attribute(images, 3, 1, "mlp", "logit", "mean", False, True, 0)


def test_none_keeps_the_explainers_value(model, images):
    explainer = ClassSpaceSaliency(model, score="rank", layer=1)
    want = explainer.attribute(images, target=4)
    assert torch.equal(explainer.attribute(images, target=4, score=None, layer=None), want)


@pytest.mark.parametrize(
    ("make", "options", "error", "match"),
    [
        (ClassSpaceSaliency, dict(score=""), ValueError, "score must be one of"),
        (ClassSpaceSaliency, dict(component=""), ValueError, "component must be one of"),
        (ClassSpaceSaliency, dict(combine="max"), ValueError, "combine must be one of"),
        (ClassSpaceSaliency, dict(per_layer="yes"), TypeError, "per_layer must be a bool"),
        (ClassSpaceSaliency, dict(differentiable=1), TypeError, "differentiable must be a bool"),
        (ClassSpaceSaliency, dict(layer=7), ValueError, "layer 7 is out of range"),
        (ClassSpaceSaliency, dict(layer=""), ValueError, "layer must be"),
        (ClassSpaceSaliency, dict(colour="red"), TypeError, r"unknown .*\['colour'\]"),
        (ClassSpaceAttentionGradient, dict(paper_exact=1), TypeError, "paper_exact"),
        (GradCAM, dict(relu="no"), TypeError, "relu must be a bool"),
        (GradCAM, dict(layer=nn.Linear(2, 2)), ValueError, "not a submodule"),
        (AttentionRollout, dict(head_fusion=""), ValueError, "head_fusion must be one of"),
        (AttentionRollout, dict(discard_ratio=2.0), ValueError, "discard_ratio"),
        (AttentionRollout, dict(start_layer=0.5), TypeError, "start_layer"),
        (RandomSaliency, dict(seed="0"), TypeError, "seed must be an int"),
    ],
)
def test_bad_options_fail_in_the_constructor_and_per_call(
    model, images, make, options, error, match
):
    with pytest.raises(error, match=match):
        make(model, **options)
    explainer = make(model)
    before = explainer.options
    with pytest.raises(error, match=match):
        explainer.attribute(images, target=1, **options)
    assert explainer.options is before


def test_unknown_constructor_arguments_list_the_options_and_model_parts(model):
    with pytest.raises(TypeError, match=r"colour.*layer.*num_prefix_tokens"):
        ClassSpaceSaliency(model, colour="red")
    with pytest.raises(TypeError, match="reserved"):  # an option cannot shadow a model part

        @dataclasses.dataclass(frozen=True)
        class Clashing(ClassSpaceOptions):
            patch_size: int = 4

        type("Bad", (ClassSpaceSaliency,), {"Options": Clashing})


def test_call_flags_are_validated(model, images):
    explainer = ClassSpaceSaliency(model)
    with pytest.raises(TypeError, match="upsample must be a bool"):
        explainer.attribute(images, upsample="yes")
    with pytest.raises(TypeError, match="input_shaped must be a bool"):
        explainer.attribute(images, input_shaped=1)
    with pytest.raises(TypeError, match="max_batch_size"):
        explainer.attribute(images, max_batch_size=1.0)


# ---------------------------------------------------------------------------- the options object
def test_options_are_frozen_and_read_as_attributes(model):
    explainer = ClassSpaceSaliency(model, layer=[0, -1], score="probability")
    assert isinstance(explainer.options, ClassSpaceOptions)
    assert explainer.layer == [0, 2] and explainer.score == "probability"
    with pytest.raises(dataclasses.FrozenInstanceError):
        explainer.options.score = "rank"
    with pytest.raises(AttributeError, match="nope"):
        _ = explainer.nope
    replaced = explainer.replace_options(score="rank")
    assert replaced.score == "rank" and explainer.score == "probability"


def test_every_method_declares_its_options_once(model):
    for name in list_methods(variants=False):
        explainer = build_method(name, model)
        fields = [f.name for f in dataclasses.fields(explainer.Options)]
        assert tuple(fields) == type(explainer)._option_order
        for field in fields:  # every declared option is readable and overridable per call
            value = getattr(explainer, field)
            assert explainer.replace_options(**{field: value}) == explainer.options


def test_captum_can_call_the_undecorated_attribute(model, images):
    explainer = ClassSpaceSaliency(model)
    direct = type(explainer).attribute.__wrapped__(explainer, images, target=1)
    assert torch.equal(direct, explainer.attribute(images, target=1))


# ---------------------------------------------------------------------------- renamed names
@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("class_space_saliency.projection", "SCORES", "TOKEN_SCORES"),
        ("class_space_saliency.evaluation.protocols", "SCORES", "CURVE_SCORES"),
        ("class_space_saliency.evaluation.protocols", "BASELINES", "BASELINE_FILLS"),
        ("class_space_saliency.evaluation.protocols", "Protocol", "PerturbationProtocol"),
        ("class_space_saliency.evaluation", "Protocol", "PerturbationProtocol"),
    ],
)
def test_old_names_warn_and_still_work(module, old, new):
    import importlib

    namespace = importlib.import_module(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(namespace, old)
    assert value is getattr(namespace, new)
    assert [w.category for w in caught] == [DeprecationWarning] and new in str(caught[0].message)
    with pytest.raises(AttributeError):
        _ = namespace.NO_SUCH_NAME


def test_token_and_curve_scores_are_distinct_sets():
    from class_space_saliency.evaluation.protocols import CURVE_SCORES
    from class_space_saliency.projection import TOKEN_SCORES

    assert "rank" in TOKEN_SCORES and "rank" not in CURVE_SCORES
    assert "accuracy" in CURVE_SCORES and "accuracy" not in TOKEN_SCORES
