"""ClassSpaceSaliency against plain-torch references on every supported ViT family."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    NUM_CLASSES,
    assert_state_unchanged,
    input_for,
    make_model,
    model_state,
    prefix_of,
    reference_project,
    reference_states,
)

from class_space_saliency import ClassSpaceSaliency, ViTAnatomy


def reference_map(model, images, target, block, component="residual", score="logit"):
    states = reference_states(model, images)
    tokens = states[component][block][:, prefix_of(model) :]
    logits = reference_project(model, tokens)  # (B, N, C)
    rows = torch.arange(len(target))
    picked = logits[rows, :, target]  # (B, N)
    if score == "probability":
        picked = logits.softmax(-1)[rows, :, target]
    if score == "rank":
        picked = 1 - (logits > picked[..., None]).sum(-1).float() / logits.shape[-1]
    grid = ViTAnatomy.from_model(model).grid_size(images.shape[-2:])
    return picked.reshape(len(target), 1, *grid)


@pytest.mark.parametrize("component", ["residual", "attention", "mlp"])
def test_logit_map_matches_reference(family, component):
    model = make_model(family)
    images = input_for(family)
    target = torch.tensor([0, 3, 6])
    explainer = ClassSpaceSaliency(model, component=component)
    for block in (0, -1):
        got = explainer.attribute(images, target=target, layer=block)
        want = reference_map(model, images, target, block, component)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("score", ["probability", "rank"])
def test_scores_match_reference(family, score):
    model = make_model(family)
    images = input_for(family)
    target = torch.tensor([1, 2, 5])
    got = ClassSpaceSaliency(model, score=score).attribute(images, target=target, layer=1)
    torch.testing.assert_close(got, reference_map(model, images, target, 1, score=score))


def test_rank_is_one_for_top1_tokens():
    model = make_model("plain")
    images = input_for("plain")
    states = reference_states(model, images)
    top1 = reference_project(model, states["residual"][-1][:, 1:]).argmax(-1)  # (B, N)
    target = top1[:, 0]
    got = ClassSpaceSaliency(model, score="rank").attribute(images, target=target).flatten(1)
    assert torch.equal(got == 1.0, top1 == target[:, None])


def test_predicted_class_is_default_target(family):
    model = make_model(family)
    images = input_for(family)
    predicted = model(images).argmax(-1)
    explainer = ClassSpaceSaliency(model, layer=[0, 2])
    torch.testing.assert_close(explainer.attribute(images), explainer.attribute(images, predicted))


def test_batched_per_example_targets_equal_one_by_one(family):
    model = make_model(family)
    images = input_for(family, batch=4)
    target = [6, 0, 2, 2]
    explainer = ClassSpaceSaliency(model, layer="all")
    batched = explainer.attribute(images, target=target)
    single = torch.cat([explainer.attribute(images[i : i + 1], target[i]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    chunked = explainer.attribute(images, target=target, max_batch_size=3)
    torch.testing.assert_close(batched, chunked, rtol=1e-4, atol=1e-5)


def test_all_layers_equal_layer_by_layer():
    model = make_model("registers")
    images = input_for("registers")
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


def test_one_forward_pass_and_no_graph():
    model = make_model("plain")
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        maps = ClassSpaceSaliency(model).attribute(input_for("plain"), layer="all", per_layer=True)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert not maps.requires_grad and maps.grad_fn is None
    assert maps.dtype == torch.float32


def test_upsampled_maps_are_bilinear_patch_maps():
    model = make_model("plain")
    images = input_for("plain")
    explainer = ClassSpaceSaliency(model)
    grid = explainer.attribute(images, target=1)
    full = explainer.attribute(images, target=1, upsample=True)
    assert full.shape == (3, 1, 32, 32)
    want = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bilinear")
    torch.testing.assert_close(full, want)


def test_model_state_untouched_after_success_and_failure(family):
    model = make_model(family)
    model.train()  # a model left in training mode must come back in training mode
    before = model_state(model)
    images = input_for(family)
    ClassSpaceSaliency(model, component="attention").attribute(images, layer="all")
    assert_state_unchanged(model, before)

    def boom(*_):
        raise RuntimeError("inside forward")

    explainer = ClassSpaceSaliency(model)
    block = explainer.anatomy.blocks[-1]
    handle = block.register_forward_hook(boom)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="inside forward"):
        explainer.attribute(images, target=1, layer=0)
    handle.remove()
    after_removal = model_state(model)
    # the only difference while it was registered was our own hook; now everything matches
    assert after_removal["hooks"] != before["hooks"]
    assert after_removal["training"] == before["training"]


def test_training_mode_model_gives_eval_maps():
    model = make_model("plain")
    images = input_for("plain")
    want = ClassSpaceSaliency(model).attribute(images, target=1)
    model.train()
    torch.testing.assert_close(ClassSpaceSaliency(model).attribute(images, target=1), want)
    assert model.training


def test_works_under_autocast():
    model = make_model("plain")
    images = input_for("plain")
    want = ClassSpaceSaliency(model).attribute(images, target=[1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ClassSpaceSaliency(model).attribute(images, target=[1, 2, 3])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.95


def test_captum_compatibility():
    from captum.attr import Attribution, visualization
    from captum.metrics import sensitivity_max

    model = make_model("plain")
    images = input_for("plain", batch=2)
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


def test_target_tensor_on_any_device_and_numclasses():
    model = make_model("distilled")
    explainer = ClassSpaceSaliency(model)
    assert explainer.num_classes == NUM_CLASSES
    maps = explainer.attribute(input_for("distilled"), target=torch.tensor(4))
    assert maps.shape == (3, 1, 4, 4)
