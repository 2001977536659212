"""Image classifiers that no adapter supports (CNNs): Grad-CAM given a layer, as Captum's and
pytorch-grad-cam's users expect, and controls that read the number of classes from the model."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from class_space_saliency import GradCAM, IntensitySaliency, RandomSaliency, SobelSaliency
from class_space_saliency.adapters import UnsupportedModelError
from class_space_saliency.methods._any_model import declared_num_classes
from class_space_saliency.testing import assert_state_unchanged, model_state


def tiny_resnet(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=num_classes)


def gradcam_by_hand(model: nn.Module, layer: nn.Module, images, target, relu=True):
    """Selvaraju et al.: the layer's feature maps weighted by the spatial mean of the target
    logit's gradient, summed over channels (plain torch, model in eval mode)."""
    features = []
    handle = layer.register_forward_hook(lambda module, args, output: features.append(output))
    try:
        logits = model.eval()(images)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), features[0])
    cam = (grad.mean((2, 3), keepdim=True) * features[0]).sum(1, keepdim=True)
    return (cam.clamp(min=0) if relu else cam).detach()


def test_gradcam_on_a_cnn_layer_matches_the_textbook_definition():
    model = tiny_resnet().train()  # handed back in training mode
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([2, 0])
    before = model_state(model)
    for layer, relu in ((model.layer4, True), (model.layer3, False)):
        want = gradcam_by_hand(model, layer, images, target, relu)
        model.train()
        got = GradCAM(model, layer=layer, relu=relu).attribute(images, target)
        assert all(m.training for m in model.modules())  # computed in eval mode, restored
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert got.shape[-2:] == want.shape[-2:]  # the layer's resolution
    assert_state_unchanged(model, before)
    assert not model.layer4._forward_hooks and not model.layer3._forward_hooks
    up = GradCAM(model, layer=model.layer4).attribute(images, target, upsample=True)
    assert up.shape == (2, 1, 64, 64)


def test_gradcam_on_a_cnn_without_a_layer_says_how():
    model = tiny_resnet()
    with pytest.raises(UnsupportedModelError, match=r"cannot find the ViT anatomy.*layer=<module>"):
        GradCAM(model)
    with pytest.raises(ValueError, match="out of range for a model with 3 classes"):
        GradCAM(model, layer=model.layer4).attribute(torch.randn(1, 3, 32, 32), target=3)
    anonymous = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UnsupportedModelError, match="num_classes="):
        GradCAM(anonymous, layer=anonymous[0])
    maps = GradCAM(anonymous, layer=anonymous[0], num_classes=4).attribute(
        torch.randn(1, 3, 10, 10), target=1
    )
    assert maps.shape == (1, 1, 8, 8)


def test_declared_num_classes_of_each_kind_of_model():
    from class_space_saliency.testing import tiny_hf_vit

    assert declared_num_classes(tiny_resnet(5)) == 5  # timm: num_classes
    assert declared_num_classes(torchvision.models.resnet18(num_classes=6)) == 6  # fc
    vgg_like = nn.Module()
    vgg_like.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 9))
    assert declared_num_classes(vgg_like) == 9  # last layer of a Sequential classifier
    assert declared_num_classes(tiny_hf_vit("vit")) == 7  # Hugging Face config.num_labels
    assert declared_num_classes(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())) is None


def test_controls_read_the_number_of_classes_from_the_model():
    model = tiny_resnet(3)
    images = torch.rand(2, 3, 32, 32)
    for control in (SobelSaliency, IntensitySaliency, RandomSaliency):
        explainer = control(model, patch_size=8)  # no num_classes=: the model says 3
        assert explainer.num_classes == 3
        assert explainer.attribute(images, target=2).shape == (2, 1, 4, 4)
        with pytest.raises(ValueError, match="out of range for a model with 3 classes"):
            explainer.attribute(images, target=3)
    anonymous = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="pass num_classes="):
        SobelSaliency(anonymous, patch_size=8)
    assert SobelSaliency(anonymous, patch_size=8, num_classes=2).num_classes == 2
