"""Captum interop for real: NoiseTunnel, infidelity, sensitivity_max, differentiable maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import NoiseTunnel
from captum.metrics import infidelity, sensitivity_max

from class_space_saliency import testing
from class_space_saliency.methods import METHODS, ClassSpaceSaliency, create_method
from class_space_saliency.testing import build_method, class_space_map_by_hand

TARGETS = [1, 4]


@pytest.fixture(scope="module")
def model(shared_models):
    return shared_models.get(testing.tiny_vit, "plain")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _noise_tunnel_by_hand(explainer, images, samples, stdev, seed):
    """NoiseTunnel's statistics from its own noise draw, repeated here in plain torch."""
    torch.manual_seed(seed)
    expanded = images.repeat_interleave(samples, 0)
    noisy = expanded + torch.normal(0, torch.full(expanded.shape, stdev))
    targets = torch.tensor(TARGETS).repeat_interleave(samples)
    maps = explainer.attribute(noisy, target=targets)
    maps = maps.reshape(images.shape[0], samples, *maps.shape[1:])
    mean, mean_sq = maps.mean(1), (maps**2).mean(1)
    return {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean**2}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_inside_noise_tunnel(model, images, name):
    explainer = build_method(name, model)
    expected = _noise_tunnel_by_hand(explainer, images, samples=3, stdev=0.2, seed=7)
    for nt_type in ("smoothgrad", "smoothgrad_sq", "vargrad"):
        torch.manual_seed(7)
        smoothed = NoiseTunnel(explainer).attribute(
            images, nt_type=nt_type, nt_samples=3, stdevs=0.2, target=TARGETS
        )
        torch.testing.assert_close(smoothed, expected[nt_type], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_input_shaped_maps_feed_captum_infidelity(model, images, name):
    explainer = build_method(name, model)
    shaped = explainer.attribute(images, target=TARGETS, input_shaped=True)
    assert shaped.shape == images.shape
    maps = explainer.attribute(images, target=TARGETS)
    by_hand = F.interpolate(maps, size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1)
    torch.testing.assert_close(shaped, by_hand)

    delta = 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    score = infidelity(
        model, lambda x: (delta, x - delta), images, shaped, target=TARGETS, n_perturb_samples=1
    )
    with torch.no_grad():
        rows = torch.arange(2), torch.tensor(TARGETS)
        change = model(images)[rows] - model(images - delta)[rows]
    expected = ((delta * shaped).flatten(1).sum(1) - change) ** 2
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["class_space", "gradcam", "chefer", "class_space_gradient"])
def test_sensitivity_max_with_attribute(model, images, name):
    explainer = create_method(name, model)
    delta = 0.02 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    score = sensitivity_max(
        explainer.attribute, images, perturb_func=lambda x: x + delta, n_perturb_samples=1,
        target=TARGETS,
    )  # fmt: skip
    before = explainer.attribute(images, target=TARGETS).flatten(1)
    after = explainer.attribute(images + delta, target=TARGETS).flatten(1)
    expected = (after - before).norm(dim=1) / before.norm(dim=1)
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-6)


def test_input_shaped_rejects_per_layer_maps(model, images):
    with pytest.raises(ValueError, match="per_layer"):
        ClassSpaceSaliency(model).attribute(images, layer="all", per_layer=True, input_shaped=True)
    with pytest.raises(TypeError, match="input_shaped"):
        ClassSpaceSaliency(model).attribute(images, input_shaped="yes")


@pytest.mark.parametrize("block", [0, 2])
def test_differentiable_maps_match_autograd_of_plain_torch(model, images, block):
    target = torch.tensor(TARGETS)
    weights = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    flags = [p.requires_grad for p in model.parameters()]

    x_ours = images.clone().requires_grad_(True)
    explainer = ClassSpaceSaliency(model, layer=block, differentiable=True)
    maps = explainer.attribute(x_ours, target=target)
    assert maps.requires_grad
    (grad_ours, head_ours) = torch.autograd.grad(
        (maps * weights).sum(), [x_ours, model.head.weight]
    )

    x_ref = images.clone().requires_grad_(True)
    reference = class_space_map_by_hand(model, x_ref, target, block, grid=(4, 4))
    torch.testing.assert_close(maps, reference, rtol=1e-4, atol=1e-5)
    (grad_ref, head_ref) = torch.autograd.grad(
        (reference * weights).sum(), [x_ref, model.head.weight]
    )
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_ours, head_ref, rtol=1e-4, atol=1e-6)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training


def test_default_maps_carry_no_graph(model, images):
    maps = ClassSpaceSaliency(model).attribute(images.clone().requires_grad_(True), target=1)
    assert not maps.requires_grad
    with torch.no_grad():  # differentiable maps respect the caller's no_grad
        assert not ClassSpaceSaliency(model, differentiable=True).attribute(images).requires_grad
