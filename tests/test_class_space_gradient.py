"""The paper's gradient map against a block-local plain-torch recomputation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from class_space_saliency import ClassSpaceAttentionGradient
from class_space_saliency.methods import create_method, method_names
from class_space_saliency.testing import (
    assert_state_unchanged,
    block_by_hand,
    class_logits,
    class_space_gradient_by_hand,
    embed_by_hand,
    model_state,
    tiny_images,
)


@pytest.mark.parametrize("family", ["plain", "distilled", "registers"])
@pytest.mark.parametrize("paper_exact", [False, True])
def test_matches_block_local_reference(tiny_vit, family, paper_exact):
    model = tiny_vit(family)
    images = tiny_images(family)
    target = torch.tensor([0, 4, 6])
    got = ClassSpaceAttentionGradient(model, paper_exact=paper_exact).attribute(images, target)
    want = class_space_gradient_by_hand(model, images, target, paper_exact)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_paper_exact_differs_and_batches_equal_singles(tiny_vit):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    explainer = ClassSpaceAttentionGradient(model)
    plain = explainer.attribute(images, [1, 2, 3])
    assert not torch.allclose(plain, explainer.attribute(images, [1, 2, 3], paper_exact=True))
    singles = torch.cat(
        [explainer.attribute(images[i : i + 1], t) for i, t in enumerate([1, 2, 3])]
    )
    torch.testing.assert_close(plain, singles, rtol=1e-4, atol=1e-6)


def test_leaves_model_untouched_with_frozen_parameters(tiny_vit):
    model = copy.deepcopy(tiny_vit("plain"))
    for p in model.parameters():
        p.requires_grad_(False)
    before = model_state(model)
    maps = ClassSpaceAttentionGradient(model).attribute(tiny_images("plain"), target=2)
    assert maps.abs().sum() > 0 and not maps.requires_grad
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("family", ["avgpool", "torchvision"])
def test_unsupported_models_get_a_clear_error(tiny_vit, family):
    with pytest.raises(TypeError, match="ClassSpaceAttentionGradient"):
        ClassSpaceAttentionGradient(tiny_vit(family))


def test_paper_variant_is_registered_with_the_double_softmax(tiny_vit):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    paper = create_method("class_space_gradient_paper", model)
    assert isinstance(paper, ClassSpaceAttentionGradient) and paper.paper_exact
    want = class_space_gradient_by_hand(model, images, torch.tensor([1, 2, 3]), paper_exact=True)
    torch.testing.assert_close(paper.attribute(images, [1, 2, 3]), want, rtol=1e-4, atol=1e-6)
    assert "class_space_gradient_paper" in method_names()
    with pytest.raises(ValueError, match="fixes"):
        create_method("class_space_gradient_paper", model, paper_exact=False)
    with pytest.raises(ValueError, match="class_space_gradient_paper"):
        create_method("no_such_method", model)


def per_head_by_hand(model, images, target) -> torch.Tensor:
    """(B, L, H, h, w): -d CE / d probs[CLS, image] of each block and head, block-local."""
    x, rope = embed_by_hand(model, images)
    x = x.detach()
    npt = model.num_prefix_tokens
    maps = []
    for block in model.blocks:
        out = block_by_hand(block, x, rope, npt, leaf_probs=True)
        loss = F.cross_entropy(class_logits(model, out.attention[:, 0]), target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, out.probs)
        maps.append(-grad[:, :, 0, npt:])
        x = out.output.detach()
    side = int(maps[0].shape[-1] ** 0.5)
    return torch.stack(maps, 1).unflatten(-1, (side, side)).detach()


@pytest.mark.parametrize("family", ["plain", "registers"])
def test_per_head_maps_match_a_hand_computation_and_sum_to_the_map(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family)
    target = torch.tensor([0, 4, 6])
    explainer = ClassSpaceAttentionGradient(model)
    heads = explainer.attribute(images, target, per_head=True)
    assert heads.shape == (3, 3, 2, 4, 4)  # (B, blocks, heads, h, w)
    torch.testing.assert_close(heads, per_head_by_hand(model, images, target), rtol=1e-4, atol=1e-6)
    summed = heads.sum((1, 2)).unsqueeze(1)
    torch.testing.assert_close(summed, explainer.attribute(images, target), rtol=1e-5, atol=1e-6)
    # one block and head alone, in the order of layer, as the paper's block-7-head-0 figures
    picked = explainer.attribute(images, target, layer=[2, 0], per_head=True)
    torch.testing.assert_close(picked, heads[:, [2, 0]])
    upsampled = explainer.attribute(images, target, layer=1, per_head=True, upsample=True)
    assert upsampled.shape == (3, 1, 2, 32, 32)
    with pytest.raises(ValueError, match="per_head"):
        explainer.attribute(images, target, per_head=True, input_shaped=True)
    with pytest.raises(TypeError, match="per_head"):
        ClassSpaceAttentionGradient(model, per_head=1)
