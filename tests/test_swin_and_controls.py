"""Swin (timm and Hugging Face): class space on the last stage, Grad-CAM, clear refusals;
and the model-agnostic controls on a plain CNN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from class_space_saliency import (
    ClassSpaceSaliency,
    GradCAM,
    IntensitySaliency,
    RandomSaliency,
    SobelSaliency,
    class_identifiability,
)
from class_space_saliency.adapters import UnsupportedModelError
from class_space_saliency.evaluation.curves import check_token_model
from class_space_saliency.methods import METHODS, create_method
from class_space_saliency.testing import (
    assert_state_unchanged,
    captum_gradcam_on_tokens,
    model_state,
    sobel_by_hand,
    tiny_images,
)

TARGET = torch.tensor([0, 4, 6])


@pytest.fixture(params=["timm", "hf"])
def kind(request) -> str:
    if request.param == "hf":
        pytest.importorskip("transformers")
    return request.param


def timm_last_stage(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs (B, 4, 4, C) of the last stage's blocks, by calling the stages in turn."""
    x = model.layers[0](model.patch_embed(images))
    x = model.layers[1].downsample(x)
    outputs = []
    for block in model.layers[1].blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def test_timm_swin_class_space_on_the_last_stage(tiny_swin):
    model = tiny_swin("timm")
    images = tiny_images()
    with torch.no_grad():
        per_position = model.head.fc(model.forward_features(images))  # (B, 4, 4, C)
        # the head is linear after the mean: the mean of the per-position logits is the output
        torch.testing.assert_close(per_position.mean((1, 2)), model(images))
        want_last = per_position[torch.arange(3), :, :, TARGET]
        stage = timm_last_stage(model, images)
        want_first = model.head.fc(model.norm(stage[0]))[torch.arange(3), :, :, TARGET]
    got = ClassSpaceSaliency(model, layer=[0, 1]).attribute(images, TARGET, per_layer=True)
    torch.testing.assert_close(got[:, 1], want_last, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[:, 0], want_first, rtol=1e-4, atol=1e-5)


def test_hf_swin_class_space_matches_hidden_states(tiny_swin):
    pytest.importorskip("transformers")
    model = tiny_swin("hf")
    images = tiny_images()
    with torch.no_grad():  # a copy: transformers hooks a model asked for its hidden states
        out = copy.deepcopy(model)(images, output_hidden_states=True)
        per_token = model.classifier(model.swin.layernorm(out.hidden_states[-1]))  # (B, 16, C)
        torch.testing.assert_close(per_token.mean(1), out.logits, rtol=1e-5, atol=1e-6)
        want = per_token[torch.arange(3), :, TARGET].reshape(3, 4, 4)
    torch.testing.assert_close(ClassSpaceSaliency(model).attribute(images, TARGET)[:, 0], want)


def test_swin_gradcam_equals_captum_on_the_last_stage(tiny_swin, kind):
    model = tiny_swin(kind)
    images = tiny_images()
    if kind == "timm":
        layer, forward = model.layers[-1].blocks[-1].norm1, model
    else:
        layer = model.swin.encoder.layers[-1].blocks[-1].layernorm_before

        def forward(x):
            return model(x).logits

    before = model_state(model)
    got = GradCAM(model).attribute(images, TARGET)
    assert GradCAM(model).layer is layer
    channels_last = kind == "timm"
    want = captum_gradcam_on_tokens(forward, layer, images, TARGET, 0, (4, 4), True, channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got.abs().sum() > 0
    assert_state_unchanged(model, before)


def test_swin_refuses_attention_methods_and_token_removal_with_a_reason(tiny_swin, kind):
    model = tiny_swin(kind)
    for name in ("rollout", "chefer", "raw_attention"):
        with pytest.raises(UnsupportedModelError, match="local windows"):
            create_method(name, model)
    with pytest.raises(UnsupportedModelError, match="needs a \\[CLS\\] token"):
        create_method("class_space_gradient", model)
    with pytest.raises(TypeError, match="merges patches"):
        check_token_model(model)
    with pytest.raises(UnsupportedModelError, match="local windows"):
        ClassSpaceSaliency(model, component="attention").attribute(tiny_images(), 0)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_controls_on_swin_use_the_last_stage_grid(tiny_swin, kind):
    model = tiny_swin(kind)
    images = tiny_images()
    torch.testing.assert_close(SobelSaliency(model).attribute(images), sobel_by_hand(images, 8))
    want = F.avg_pool2d(images.mean(1, keepdim=True), 8)
    torch.testing.assert_close(IntensitySaliency(model).attribute(images, TARGET), want)


def test_controls_work_on_a_cnn():
    model = TinyCNN().eval()
    images = tiny_images(batch=2)
    gray = images.mean(1, keepdim=True)
    want = F.avg_pool2d(gray, 8)
    got = IntensitySaliency(model, patch_size=8, num_classes=5).attribute(images, 4)
    torch.testing.assert_close(got, want)
    got = SobelSaliency(model, patch_size=8, num_classes=5).attribute(images)
    torch.testing.assert_close(got, sobel_by_hand(images, 8))
    noise = RandomSaliency(model, seed=3, patch_size=(4, 8), num_classes=5).attribute(images)
    assert noise.shape == (2, 1, 8, 4) and ((noise >= 0) & (noise < 1)).all()
    with pytest.raises(ValueError, match="out of range"):
        SobelSaliency(model, patch_size=8, num_classes=5).attribute(images, 5)
    with pytest.raises(UnsupportedModelError, match=r"patch_size= .* and num_classes="):
        SobelSaliency(model)
    with pytest.raises(UnsupportedModelError, match="cannot find the ViT anatomy"):
        ClassSpaceSaliency(model)


def test_model_methods_refuse_a_cnn_with_a_reason():
    model = TinyCNN().eval()
    controls = {"random", "sobel", "intensity"}
    for name in sorted(set(METHODS) - controls):
        with pytest.raises(UnsupportedModelError, match=r"looked for|cannot find"):
            create_method(name, model)
    with pytest.raises(UnsupportedModelError, match=r"looked for|cannot find"):
        class_identifiability(model, tiny_images(batch=2), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="token removal is not supported for TinyCNN"):
        check_token_model(model)


def test_swin_identifiability_on_the_last_stage(tiny_swin, kind):
    model = tiny_swin(kind)
    images, labels = tiny_images(), torch.tensor([0, 3, 6])
    result = class_identifiability(model, images, labels)
    with torch.no_grad():  # the model's own final norm and per-position head, by hand
        if kind == "timm":
            logits = model.head.fc(model.forward_features(images)).flatten(1, 2)
        else:
            logits = model.classifier(model.swin(images).last_hidden_state)
    label_logit = logits[torch.arange(3), :, labels]
    rank = 1 - (logits > label_logit[..., None]).sum(-1).float() / logits.shape[-1]
    rate = (logits.argmax(-1) == labels[:, None]).float().mean(1).mean() * 100
    torch.testing.assert_close(result.token_rank[-1], rank.mean())
    torch.testing.assert_close(result.token_rate[-1], rate)
    assert result.cls_rank is None and result.cls_rate is None
