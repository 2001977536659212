"""ClassSpaceSaliency against plain-torch references on every supported ViT family."""

from __future__ import annotations

import copy

import pytest
import torch

from class_space_saliency import ClassSpaceSaliency, ViTAnatomy
from class_space_saliency.testing import (
    NUM_CLASSES,
    assert_state_unchanged,
    class_logits,
    class_space_map_by_hand,
    model_state,
    tiny_images,
    token_states,
)


@torch.no_grad()
def reference_map(model, images, target, block, component="residual", score="logit"):
    grid = ViTAnatomy.from_model(model).grid_size(images.shape[-2:])
    return class_space_map_by_hand(model, images, target, block, grid, component, score)


@pytest.mark.parametrize("component", ["residual", "attention", "mlp"])
def test_logit_map_matches_reference(tiny_vit, family, component):
    model = tiny_vit(family)
    images = tiny_images(family)
    target = torch.tensor([0, 3, 6])
    explainer = ClassSpaceSaliency(model, component=component)
    for block in (0, -1):
        got = explainer.attribute(images, target=target, layer=block)
        want = reference_map(model, images, target, block, component)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("score", ["probability", "rank"])
def test_scores_match_reference(tiny_vit, family, score):
    model = tiny_vit(family)
    images = tiny_images(family)
    target = torch.tensor([1, 2, 5])
    got = ClassSpaceSaliency(model, score=score).attribute(images, target=target, layer=1)
    torch.testing.assert_close(got, reference_map(model, images, target, 1, score=score))


def test_rank_is_one_for_top1_tokens(tiny_vit):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    with torch.no_grad():
        states = token_states(model, images)
        top1 = class_logits(model, states["residual"][-1][:, 1:]).argmax(-1)  # (B, N)
    target = top1[:, 0]
    got = ClassSpaceSaliency(model, score="rank").attribute(images, target=target).flatten(1)
    assert torch.equal(got == 1.0, top1 == target[:, None])


def test_predicted_class_is_default_target(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    predicted = model(images).argmax(-1)
    explainer = ClassSpaceSaliency(model, layer=[0, 2])
    torch.testing.assert_close(explainer.attribute(images), explainer.attribute(images, predicted))


def test_batched_per_example_targets_equal_one_by_one(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family, batch=4)
    target = [6, 0, 2, 2]
    explainer = ClassSpaceSaliency(model, layer="all")
    batched = explainer.attribute(images, target=target)
    single = torch.cat([explainer.attribute(images[i : i + 1], target[i]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    chunked = explainer.attribute(images, target=target, max_batch_size=3)
    torch.testing.assert_close(batched, chunked, rtol=1e-4, atol=1e-5)


def test_all_layers_equal_layer_by_layer(tiny_vit):
    model = tiny_vit("registers")
    images = tiny_images("registers")
    explainer = ClassSpaceSaliency(model)
    every = explainer.attribute(images, target=2, layer="all", per_layer=True)
    assert every.shape == (3, 3, 4, 4)
    for block in range(3):
        torch.testing.assert_close(
            every[:, block : block + 1], explainer.attribute(images, 2, block)
        )
    torch.testing.assert_close(explainer.attribute(images, 2, "all"), every.mean(1, keepdim=True))
    summed = explainer.attribute(images, 2, [0, 2], combine="sum")
    torch.testing.assert_close(summed, every[:, [0, 2]].sum(1, keepdim=True))


def test_one_forward_pass_and_no_graph(tiny_vit):
    model = tiny_vit("plain")
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        maps = ClassSpaceSaliency(model).attribute(
            tiny_images("plain"), layer="all", per_layer=True
        )
    finally:
        handle.remove()
    assert len(calls) == 1
    assert not maps.requires_grad and maps.grad_fn is None
    assert maps.dtype == torch.float32


def test_upsampled_maps_are_bilinear_patch_maps(tiny_vit):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    explainer = ClassSpaceSaliency(model)
    grid = explainer.attribute(images, target=1)
    full = explainer.attribute(images, target=1, upsample=True)
    assert full.shape == (3, 1, 32, 32)
    want = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bilinear")
    torch.testing.assert_close(full, want)


def test_model_state_untouched_after_success_and_failure(tiny_vit, family):
    model = copy.deepcopy(tiny_vit(family))
    model.train()  # a model left in training mode must come back in training mode
    before = model_state(model)
    images = tiny_images(family)
    ClassSpaceSaliency(model, component="attention").attribute(images, layer="all")
    assert_state_unchanged(model, before)

    def boom(*_):
        raise RuntimeError("inside forward")

    explainer = ClassSpaceSaliency(model)
    handle = explainer.anatomy.blocks[-1].register_forward_hook(boom)
    with_boom = model_state(model)
    with pytest.raises(RuntimeError, match="inside forward"):
        explainer.attribute(images, target=1, layer=0)
    # the library's own hooks came off and the mode came back although the forward failed:
    # only our hook is left, and without it the model is as at the start
    assert_state_unchanged(model, with_boom)
    handle.remove()
    assert_state_unchanged(model, before)


def test_training_mode_model_gives_eval_maps(tiny_vit):
    model = copy.deepcopy(tiny_vit("plain"))
    images = tiny_images("plain")
    want = ClassSpaceSaliency(model).attribute(images, target=1)
    model.train()
    torch.testing.assert_close(ClassSpaceSaliency(model).attribute(images, target=1), want)
    assert model.training


def test_works_under_autocast(tiny_vit):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    want = ClassSpaceSaliency(model).attribute(images, target=[1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ClassSpaceSaliency(model).attribute(images, target=[1, 2, 3])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.95


def test_captum_compatibility(tiny_vit):
    from captum.attr import Attribution, visualization
    from captum.metrics import sensitivity_max

    model = tiny_vit("plain")
    images = tiny_images("plain", batch=2)
    explainer = ClassSpaceSaliency(model)
    assert isinstance(explainer, Attribution)
    sens = sensitivity_max(explainer.attribute, images, target=torch.tensor([1, 2]))
    assert sens.shape == (2,) and torch.isfinite(sens).all()
    maps = explainer.attribute(images, target=1, upsample=True)
    figure, _ = visualization.visualize_image_attr(
        maps[0].permute(1, 2, 0).numpy(),
        images[0].permute(1, 2, 0).numpy().clip(0, 1),
        method="blended_heat_map",
        sign="all",
        use_pyplot=False,
    )
    assert figure is not None


def test_target_tensor_on_any_device_and_numclasses(tiny_vit):
    model = tiny_vit("distilled")
    explainer = ClassSpaceSaliency(model)
    assert explainer.num_classes == NUM_CLASSES
    maps = explainer.attribute(tiny_images("distilled"), target=torch.tensor(4))
    assert maps.shape == (3, 1, 4, 4)
