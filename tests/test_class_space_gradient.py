"""The paper's gradient map against a block-local plain-torch recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_state_unchanged,
    input_for,
    make_model,
    model_state,
    reference_project,
)

from class_space_saliency import ClassSpaceAttentionGradient
from class_space_saliency.methods import create_method, method_names


def reference_gradient_map(model, images, target, paper_exact=False):
    """-d CE(head(norm(attn_out[CLS])), c) / d a[CLS, image tokens], per block, summed."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images))).detach()
    total = 0.0
    for block in model.blocks:
        a = block.attn
        h = block.norm1(x)
        b, n, d = h.shape
        qkv = a.qkv(h).reshape(b, n, 3, a.num_heads, d // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1).detach().requires_grad_()
        attn = block.ls1(a.proj((probs @ v).transpose(1, 2).reshape(b, n, d)))
        logits = reference_project(model, attn[:, 0])
        if paper_exact:
            logits = logits.softmax(-1)
        loss = F.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, probs)
        total = total - grad[:, :, 0, prefix:].sum(1)
        x = x + attn
        x = (x + block.ls2(block.mlp(block.norm2(x)))).detach()
    side = int(total.shape[-1] ** 0.5)
    return total.reshape(b, 1, side, side).detach()


@pytest.mark.parametrize("family", ["plain", "distilled", "registers"])
@pytest.mark.parametrize("paper_exact", [False, True])
def test_matches_block_local_reference(family, paper_exact):
    model = make_model(family)
    images = input_for(family)
    target = torch.tensor([0, 4, 6])
    got = ClassSpaceAttentionGradient(model, paper_exact=paper_exact).attribute(images, target)
    want = reference_gradient_map(model, images, target, paper_exact)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_paper_exact_differs_and_batches_equal_singles():
    model = make_model("plain")
    images = input_for("plain")
    explainer = ClassSpaceAttentionGradient(model)
    plain = explainer.attribute(images, [1, 2, 3])
    assert not torch.allclose(plain, explainer.attribute(images, [1, 2, 3], paper_exact=True))
    singles = torch.cat(
        [explainer.attribute(images[i : i + 1], t) for i, t in enumerate([1, 2, 3])]
    )
    torch.testing.assert_close(plain, singles, rtol=1e-4, atol=1e-6)


def test_leaves_model_untouched_with_frozen_parameters():
    model = make_model("plain")
    for p in model.parameters():
        p.requires_grad_(False)
    before = model_state(model)
    maps = ClassSpaceAttentionGradient(model).attribute(input_for("plain"), target=2)
    assert maps.abs().sum() > 0 and not maps.requires_grad
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("family", ["avgpool", "torchvision"])
def test_unsupported_models_get_a_clear_error(family):
    with pytest.raises(TypeError, match="ClassSpaceAttentionGradient"):
        ClassSpaceAttentionGradient(make_model(family))


def test_paper_variant_is_registered_with_the_double_softmax():
    model = make_model("plain")
    images = input_for("plain")
    paper = create_method("class_space_gradient_paper", model)
    assert isinstance(paper, ClassSpaceAttentionGradient) and paper.paper_exact
    want = reference_gradient_map(model, images, torch.tensor([1, 2, 3]), paper_exact=True)
    torch.testing.assert_close(paper.attribute(images, [1, 2, 3]), want, rtol=1e-4, atol=1e-6)
    assert "class_space_gradient_paper" in method_names()
    with pytest.raises(ValueError, match="fixes"):
        create_method("class_space_gradient_paper", model, paper_exact=False)
    with pytest.raises(ValueError, match="class_space_gradient_paper"):
        create_method("no_such_method", model)
