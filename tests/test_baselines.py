"""The field's baselines against independent plain-torch (and Captum) references."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from class_space_saliency import (
    AttentionRollout,
    CheferRollout,
    GradCAM,
    IntensitySaliency,
    RandomSaliency,
    RawAttention,
    SobelSaliency,
    ViTAnatomy,
)
from class_space_saliency.methods import METHODS, create_method, list_methods
from class_space_saliency.methods.chefer import gradient_weighted_rollout
from class_space_saliency.methods.controls import pool_to_grid
from class_space_saliency.methods.rollout import attention_rollout
from class_space_saliency.testing import (
    NUM_CLASSES,
    VIT_FAMILIES,
    assert_state_unchanged,
    build_method,
    captum_gradcam_on_tokens,
    chefer_by_hand,
    gradcam_by_hand,
    model_state,
    num_prefix_tokens_of,
    rollout_by_hand,
    sobel_by_hand,
    tiny_images,
    token_states,
)

TIMM_FAMILIES = [f for f in VIT_FAMILIES if f != "torchvision"]
TARGET = torch.tensor([0, 4, 6])


def grid_of(model, images):
    return ViTAnatomy.from_model(model).grid_size(images.shape[-2:])


def as_maps(rows, grid):
    """(B, h*w) -> (B, 1, h, w)."""
    return rows.reshape(rows.shape[0], 1, *grid)


def image_row(matrix, prefix, distilled=False):
    """[CLS] row at image columns (DeiT distilled: mean of the [CLS] and distillation rows,
    whose heads are averaged); no [CLS]: mean over the (image) query rows."""
    if distilled:
        return (matrix[:, 0, prefix:] + matrix[:, 1, prefix:]) / 2
    return matrix[:, 0, prefix:] if prefix else matrix[:, prefix:, prefix:].mean(1)


@torch.no_grad()
def attention_probs(model, images):
    return token_states(model, images)["attn_probs"]


# ---------------------------------------------------------------------------- rollout / raw
def reference_rollout(probs, fusion="mean", discard=0.0, prefix=1, distilled=False):
    """The image row of the rollout, which keeps entry (0, 0) only when there is a [CLS]."""
    return image_row(
        rollout_by_hand(probs, fusion, discard, keep_first=prefix > 0), prefix, distilled
    )


def test_rollout_matches_reference(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    probs = attention_probs(model, images)
    prefix = num_prefix_tokens_of(model)
    rollout = reference_rollout(probs, prefix=prefix, distilled=family == "distilled")
    want = as_maps(rollout, grid_of(model, images))
    got = AttentionRollout(model).attribute(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "fusion", "discard", "start"),
    [
        ("plain", "max", 0.5, 0),
        ("plain", "min", 0.9, 1),
        ("distilled", "mean", 0.3, -2),
        ("registers", "max", 0.7, 0),
        ("avgpool", "min", 0.5, 0),
        ("torchvision", "max", 0.6, 1),
    ],
)
def test_rollout_options_match_reference(tiny_vit, family, fusion, discard, start):
    model = tiny_vit(family)
    images = tiny_images(family)
    probs = attention_probs(model, images)[start:]
    prefix = num_prefix_tokens_of(model)
    want = reference_rollout(probs, fusion, discard, prefix, family == "distilled")
    want = as_maps(want, grid_of(model, images))
    got = AttentionRollout(model, head_fusion=fusion, discard_ratio=discard, start_layer=start)
    torch.testing.assert_close(got.attribute(images), want, rtol=1e-4, atol=1e-6)
    # the same options given per call
    per_call = AttentionRollout(model).attribute(
        images, head_fusion=fusion, discard_ratio=discard, start_layer=start
    )
    torch.testing.assert_close(per_call, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_rows_sum_to_one_and_identity_is_kept(fusion, discard):
    generator = torch.Generator().manual_seed(0)
    attentions = [torch.randn(2, 3, 6, 6, generator=generator).softmax(-1) for _ in range(4)]
    rolled = attention_rollout(attentions, fusion, discard)
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2, 6))
    eye = torch.eye(6).expand(2, 3, 6, 6)
    assert torch.equal(
        attention_rollout([eye, eye, eye], fusion, discard), torch.eye(6).expand(2, 6, 6)
    )


def test_discard_ratio_on_a_hand_made_pattern():
    attention = torch.tensor(
        [
            [[0.01, 0.60, 0.39], [0.25, 0.35, 0.40], [0.15, 0.05, 0.80]],
            [[0.90, 0.02, 0.08], [0.70, 0.10, 0.20], [0.03, 0.47, 0.50]],
        ]
    )[:, None]  # (B=2, heads=1, 3, 3)
    # 4 = int(0.5 * 8) lowest entries of each example, the [CLS]->[CLS] entry excluded.
    kept = torch.tensor(
        [
            [[0.01, 0.60, 0.39], [0.00, 0.00, 0.40], [0.00, 0.00, 0.80]],
            [[0.90, 0.00, 0.00], [0.70, 0.00, 0.20], [0.00, 0.47, 0.50]],
        ]
    )
    want = kept + torch.eye(3)
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(attention_rollout([attention], discard_ratio=0.5), want)
    # each example on its own: the batch does not change an example's result
    torch.testing.assert_close(attention_rollout([attention[1:]], discard_ratio=0.5), want[1:])
    # without a [CLS] token, entry (0, 0) competes too: int(0.5 * 9) = 4 lowest
    open_first = torch.tensor([[0.00, 0.60, 0.39], [0.00, 0.35, 0.40], [0.00, 0.00, 0.80]])
    want = open_first + torch.eye(3)
    got = attention_rollout([attention[:1]], discard_ratio=0.5, keep_first=False)
    torch.testing.assert_close(got[0], want / want.sum(-1, keepdim=True))


def test_raw_attention_matches_reference(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    probs = attention_probs(model, images)
    grid = grid_of(model, images)
    for layer in (-1, 0):
        want = image_row(probs[layer].mean(1), num_prefix_tokens_of(model), family == "distilled")
        want = as_maps(want, grid)
        got = RawAttention(model, layer=layer).attribute(images)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_rollout_option_errors(tiny_vit):
    model = tiny_vit("plain")
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(model, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        AttentionRollout(model, discard_ratio=1.5)
    with pytest.raises(ValueError, match="out of range"):
        AttentionRollout(model, start_layer=3)
    with pytest.raises(TypeError, match="start_layer"):
        AttentionRollout(model, start_layer="all")
    with pytest.raises(ValueError, match="discard_ratio"):
        AttentionRollout(model).attribute(tiny_images("plain"), discard_ratio=-0.1)


# ---------------------------------------------------------------------------- Chefer
def reference_chefer(model, images, target):
    """Manual forward with every block's probabilities on the graph; R <- R + Ā R."""
    states = token_states(model, images)
    logits = model.forward_head(model.norm(states["residual"][-1]))
    probs = states["attn_probs"]
    grads = torch.autograd.grad(logits[torch.arange(len(target)), target].sum(), probs)
    relevance = chefer_by_hand(probs, grads)
    distilled = hasattr(model, "head_dist")
    return image_row(relevance, model.num_prefix_tokens, distilled).detach()


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_chefer_matches_reference(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    want = as_maps(reference_chefer(model, images, TARGET), grid_of(model, images))
    got = CheferRollout(model).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert got.abs().sum() > 0


def test_chefer_with_zero_gradients_is_identity():
    attentions = [torch.rand(2, 3, 5, 5) for _ in range(3)]
    zeros = [torch.zeros_like(a) for a in attentions]
    assert torch.equal(gradient_weighted_rollout(attentions, zeros), torch.eye(5).expand(2, 5, 5))


def test_chefer_rejects_torchvision(tiny_vit):
    with pytest.raises(TypeError, match="CheferRollout needs differentiable attention"):
        CheferRollout(tiny_vit("torchvision"))


# ---------------------------------------------------------------------------- Grad-CAM
def reference_gradcam(model, images, target, block_index=-1, relu=True):
    """Plain torch: the chosen block's norm1 output as a leaf, the rest of the model by hand."""
    states = token_states(model, images, leaf_block=block_index % len(model.blocks))
    logits = model.forward_head(model.norm(states["residual"][-1]))
    (leaf,) = states["leaf"]
    (grad,) = torch.autograd.grad(logits[torch.arange(len(target)), target].sum(), leaf)
    return gradcam_by_hand(leaf, grad, model.num_prefix_tokens, relu)


def captum_on_reshaped_tokens(model, images, target, layer, relu=True):
    """Captum's LayerGradCam on a probe that sees the layer's image tokens as (B, D, h, w)."""
    prefix, grid = num_prefix_tokens_of(model), grid_of(model, images)
    return captum_gradcam_on_tokens(model, layer, images, target, prefix, grid, relu)


def default_layer(model, block=-1):
    if isinstance(model, torchvision.models.VisionTransformer):
        return model.encoder.layers[block].ln_1
    return model.blocks[block].norm1


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_gradcam_matches_plain_torch_reference(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    want = as_maps(reference_gradcam(model, images, TARGET), grid_of(model, images))
    got = GradCAM(model).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert got.abs().sum() > 0


def test_gradcam_block_index_and_sign(tiny_vit):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    grid = grid_of(model, images)
    want = as_maps(reference_gradcam(model, images, TARGET, block_index=0, relu=False), grid)
    got = GradCAM(model, layer=0, relu=False).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert (got < 0).any()
    relu = GradCAM(model, layer=0).attribute(images, TARGET)
    torch.testing.assert_close(relu, got.clamp(min=0))
    torch.testing.assert_close(GradCAM(model, layer=0).attribute(images, TARGET, relu=False), got)


def test_gradcam_equals_captum_layergradcam_on_reshaped_tokens(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    for block, relu in ((-1, True), (1, False)):
        layer = default_layer(model, block)
        want = captum_on_reshaped_tokens(model, images, TARGET, layer, relu)
        got = GradCAM(model, layer=layer, relu=relu).attribute(images, TARGET)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the default layer is the last block's first norm in every family
    assert GradCAM(model).layer is default_layer(model)


def test_gradcam_gradient_stops_at_the_layer(tiny_vit):
    model = tiny_vit("plain")
    reached = []

    def watch(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda grad: reached.append(True))

    handle = model.blocks[0].register_forward_hook(watch)
    try:
        maps = GradCAM(model).attribute(tiny_images("plain"), TARGET)
    finally:
        handle.remove()
    assert maps.abs().sum() > 0 and not reached


def test_gradcam_layer_errors(tiny_vit):
    model = tiny_vit("plain")
    before = model_state(model)
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(model, layer=nn.LayerNorm(32))
    with pytest.raises(TypeError, match=r"block index or an nn\.Module"):
        GradCAM(model, layer="blocks.2")
    with pytest.raises(TypeError, match=r"tokens \(B, N, D\)"):
        GradCAM(model, layer=model.patch_embed.proj).attribute(tiny_images("plain"), 1)
    assert_state_unchanged(model, before)  # the hooks came off after the error


# ---------------------------------------------------------------------------- batching, state
@pytest.mark.parametrize("name", ["gradcam", "chefer", "rollout", "raw_attention"])
@pytest.mark.parametrize("family", ["plain", "registers"])
def test_batched_per_example_targets_equal_one_by_one(tiny_vit, name, family):
    model = tiny_vit(family)
    images = tiny_images(family, batch=4)
    target = [6, 0, 2, 2]
    explainer = create_method(name, model)
    batched = explainer.attribute(images, target=target)
    singles = torch.cat([explainer.attribute(images[i : i + 1], target[i]) for i in range(4)])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-6)
    chunked = explainer.attribute(images, target=target, max_batch_size=3)
    torch.testing.assert_close(chunked, batched, rtol=1e-4, atol=1e-6)
    predicted = model(images).argmax(-1)
    torch.testing.assert_close(explainer.attribute(images), explainer.attribute(images, predicted))


@pytest.mark.parametrize("name", list_methods(variants=False))
def test_model_state_untouched(tiny_vit, name):
    model = copy.deepcopy(tiny_vit("plain"))
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    model.train()
    before = model_state(model)
    maps = build_method(name, model).attribute(tiny_images("plain"), target=[1, 2, 3])
    assert maps.shape == (3, 1, 4, 4) and maps.dtype == torch.float32 and not maps.requires_grad
    assert_state_unchanged(model, before)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


@pytest.mark.parametrize("name", ["gradcam", "chefer"])
def test_gradient_methods_work_with_frozen_parameters(tiny_vit, name):
    model = copy.deepcopy(tiny_vit("distilled"))
    images = tiny_images("distilled")
    want = create_method(name, model).attribute(images, TARGET)
    for p in model.parameters():
        p.requires_grad_(False)
    before = model_state(model)
    torch.testing.assert_close(create_method(name, model).attribute(images, TARGET), want)
    assert_state_unchanged(model, before)


def test_torchvision_gradcam_and_rollout_leave_state_untouched(tiny_vit):
    model = copy.deepcopy(tiny_vit("torchvision")).train()
    before = model_state(model)
    for name in ("gradcam", "rollout", "raw_attention"):
        create_method(name, model).attribute(tiny_images("torchvision"), target=2)
    assert_state_unchanged(model, before)


def test_registry_cost_and_upsample(tiny_vit):
    model = tiny_vit("dynamic")
    images = tiny_images("dynamic", batch=2)
    expected = {
        "gradcam": GradCAM,
        "rollout": AttentionRollout,
        "chefer": CheferRollout,
        "raw_attention": RawAttention,
        "random": RandomSaliency,
        "sobel": SobelSaliency,
        "intensity": IntensitySaliency,
    }
    for name, cls in expected.items():
        assert METHODS[name] is cls
        assert isinstance(cls.cost, str) and cls.cost
        explainer = create_method(name, model)
        assert explainer.attribute(images, upsample=True).shape == (2, 1, 24, 40)
    with pytest.raises(ValueError, match="out of range"):
        RandomSaliency(model).attribute(images, target=NUM_CLASSES)


# ---------------------------------------------------------------------------- controls
def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_random_is_seeded_and_reproducible(tiny_vit):
    model = tiny_vit("plain")
    images = tiny_images("plain", batch=4)
    rng = torch.get_rng_state()
    first = RandomSaliency(model, seed=3).attribute(images)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not used
    explainer = RandomSaliency(model, seed=3)
    assert torch.equal(explainer.attribute(images), first)
    assert torch.equal(explainer.attribute(images), first)  # every call starts afresh
    assert torch.equal(explainer.attribute(images, max_batch_size=1), first)
    # a map belongs to its image, not to a batch position: reordering permutes the maps
    assert torch.equal(explainer.attribute(images[[2, 0]]), first[[2, 0]])
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(RandomSaliency(model, seed=4).attribute(images), first)
    assert first.min() >= 0 and first.max() < 1 and first.std() > 0.1
    with pytest.raises(TypeError, match="seed"):
        RandomSaliency(model, seed=0.5)


@pytest.mark.parametrize("family", ["plain", "dynamic", "distilled", "avgpool", "torchvision"])
def test_sobel_matches_hand_computation_and_ignores_the_model(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    patch = ViTAnatomy.from_model(model).patch_size
    calls, handle = count_forwards(model)
    try:
        got = SobelSaliency(model).attribute(images)
    finally:
        handle.remove()
    assert not calls
    torch.testing.assert_close(got, sobel_by_hand(images, patch), rtol=1e-5, atol=1e-5)
    other = tiny_vit("registers" if family == "plain" else "plain")
    if family == "plain":
        assert torch.equal(SobelSaliency(other).attribute(images), got)
    # a constant image has no edges (not even at its frame); a vertical step lights up
    flat = torch.full((1, 3, *images.shape[-2:]), 0.5)
    assert torch.equal(SobelSaliency(model).attribute(flat), torch.zeros_like(got[:1]))
    step = flat.clone()
    step[..., patch[1] * 2 :] = -1.0
    edge = SobelSaliency(model).attribute(step)[0, 0]
    assert (edge[:, 1] > 0).all() and (edge[:, 2] > 0).all() and edge[:, 0].eq(0).all()


@pytest.mark.parametrize("family", ["plain", "dynamic"])
def test_intensity_is_the_patch_mean_and_ignores_the_model(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    (ph, pw), (h, w) = ViTAnatomy.from_model(model).patch_size, grid_of(model, images)
    calls, handle = count_forwards(model)
    try:
        got = IntensitySaliency(model).attribute(images)
        RandomSaliency(model).attribute(images)
    finally:
        handle.remove()
    assert not calls
    want = images.mean(1).reshape(len(images), h, ph, w, pw).mean((2, 4))[:, None]
    torch.testing.assert_close(got, want)
    brighter = IntensitySaliency(model).attribute(images + 0.5)
    torch.testing.assert_close(brighter, got + 0.5)


def test_pool_to_grid_crops_and_pads():
    ones = torch.ones(1, 1, 10, 10)
    assert torch.equal(pool_to_grid(ones, (2, 2), (4, 4)), torch.ones(1, 1, 2, 2))
    padded = pool_to_grid(ones, (3, 3), (4, 4))[0, 0]
    assert padded[0, 0] == 1 and padded[0, 2] == 0.5 and padded[2, 2] == 0.25
