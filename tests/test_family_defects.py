"""Defects found by ``benchmarks/family_sweep.py`` in timm's and transformers' zoos, each
against a plain-torch computation written out here from the model's own modules (or
refused with its reason). Every test here fails on the code before the fixes.

- post-norm blocks (the paper's GAP model ``vit_base_patch16_rpn_224``, its relative-position
  twin, EVA-02 CLIP enormous): the branches added to the stream are ``norm1(attn(x))`` and
  ``norm2(mlp(x))``; Grad-CAM's default layer is the last block's attention input;
- [CLS] joining late (ConViT before ``local_up_to_layer``, CaiT and XCiT after their blocks)
  and no [CLS] at all (Hugging Face I-JEPA): per-block token counts, [CLS] statistics only
  where the head's [CLS] is;
- hybrid patch embeddings (ViTamin, ResNet-ViT hybrids): one token per 16x16 pixels;
- Data2VecVision, differential attention, parallel blocks: refused with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from class_space_saliency import (
    AttentionRollout,
    CheferRollout,
    ClassSpaceAttentionGradient,
    ClassSpaceSaliency,
    GradCAM,
    RawAttention,
    SobelSaliency,
    ViTAnatomy,
    class_identifiability,
)
from class_space_saliency.adapters import UnsupportedModelError, find_token_path
from class_space_saliency.methods import create_method
from class_space_saliency.testing import (
    assert_state_unchanged,
    attention_by_hand,
    captum_gradcam_on_tokens,
    class_space_gradient_by_hand,
    gradcam_by_hand,
    model_state,
    perturb_weights,
    rollout_by_hand,
    sobel_by_hand,
    tiny_images,
)

TARGET = torch.tensor([0, 4, 6])
LABELS = torch.tensor([0, 1, 2])
POST_NORM = (
    "vit_base_patch16_rpn_224",
    "vit_relpos_base_patch16_rpn_224",
    "eva02_enormous_patch14_clip_224",
)


def target_maps(logits: torch.Tensor, grid: tuple[int, int] = (4, 4)) -> torch.Tensor:
    """(B, N, C) per-token logits -> (B, 1, h, w) maps of TARGET."""
    picked = logits[torch.arange(len(TARGET)), :, TARGET]
    return picked.reshape(len(TARGET), 1, *grid)


def image_top1_rate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """% of image tokens whose top-1 class is the label, averaged over images."""
    return (logits.argmax(-1) == labels[:, None]).float().mean(1).mean() * 100


@contextlib.contextmanager
def block_inputs(blocks: nn.ModuleList):
    """Record each block's positional inputs during a forward pass (hooks come off)."""
    seen: list[tuple] = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args)) for b in blocks]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- post-norm blocks (GAP model)
def post_norm_states(model: nn.Module, images: torch.Tensor, leaf_block: int | None = None):
    """Every block written out: ``x = x + norm1(attn(x))``, then ``x = x + norm2(mlp(x))``.

    Returns per block ``(output, attention branch, mlp branch, input)``; the input of
    ``leaf_block`` becomes a new autograd leaf (Grad-CAM's layer).
    """
    x = model.patch_embed(images)
    if hasattr(model, "_pos_embed"):
        x = model._pos_embed(x)
        x = x[0] if isinstance(x, tuple) else x  # EVA: (tokens, rotary embedding or None)
    x = getattr(model, "norm_pre", nn.Identity())(x)
    states = []
    for index, block in enumerate(model.blocks):
        if index == leaf_block:
            x = x.detach().requires_grad_(True)
        block_input = x
        attention = block.norm1(block.attn(x))
        x = x + attention
        mlp = block.norm2(block.mlp(x))
        x = x + mlp
        states.append((x, attention, mlp, block_input))
    return states


@pytest.mark.parametrize("architecture", POST_NORM)
def test_post_norm_components_are_the_normalised_branches(tiny_timm, architecture):
    model = tiny_timm(architecture)
    images = tiny_images()
    npt = model.num_prefix_tokens
    with torch.no_grad():
        states = post_norm_states(model, images)
        logits = model.forward_head(model.norm(states[-1][0]))
        torch.testing.assert_close(logits, model(images))  # the hand forward is the model
    for position, component in enumerate(("residual", "attention", "mlp")):
        got = ClassSpaceSaliency(model, component=component, layer="all", per_layer=True)
        maps = got.attribute(images, TARGET)
        for block, state in enumerate(states):
            with torch.no_grad():
                tokens = model.fc_norm(model.norm(state[position][:, npt:]))
                want = target_maps(model.head(tokens))
            torch.testing.assert_close(maps[:, block : block + 1], want, rtol=1e-4, atol=1e-5)


def test_gap_model_identifiability_by_hand(tiny_timm):
    model = tiny_timm("vit_base_patch16_rpn_224")  # no [CLS]: the head averages all tokens
    images = tiny_images()
    result = class_identifiability(model, images, LABELS, component="attention")
    with torch.no_grad():
        states = post_norm_states(model, images)
    for block, (_, attention, _, _) in enumerate(states):
        with torch.no_grad():
            logits = model.head(model.fc_norm(attention))
        torch.testing.assert_close(result.token_rate[block], image_top1_rate(logits, LABELS))
    assert result.cls_rank is None and result.cls_rate is None


@pytest.mark.parametrize("architecture", POST_NORM)
def test_post_norm_gradcam_explains_the_last_blocks_attention_input(tiny_timm, architecture):
    model = tiny_timm(architecture)
    images = tiny_images()
    npt = model.num_prefix_tokens
    states = post_norm_states(model, images, leaf_block=1)
    leaf = states[1][3]
    logits = model.forward_head(model.norm(states[-1][0]))
    (grad,) = torch.autograd.grad(logits[torch.arange(3), TARGET].sum(), leaf)
    explainer = GradCAM(model)
    assert explainer.layer is model.blocks[0]  # its output is the last block's input
    got = explainer.attribute(images, TARGET)
    want = gradcam_by_hand(leaf, grad, npt).reshape(3, 1, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    signed = GradCAM(model, relu=False).attribute(images, TARGET)
    assert signed.abs().flatten(1).amax(1).gt(0).all()  # was all-zero on [CLS] models


def test_post_norm_gradient_map_reads_the_normalised_attention_branch(tiny_timm):
    model = tiny_timm("eva02_enormous_patch14_clip_224")  # post-norm blocks, [CLS] head
    images = tiny_images()
    got = ClassSpaceAttentionGradient(model).attribute(images, TARGET)
    want = class_space_gradient_by_hand(model, images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- [CLS] joining late
def convit_states(model: nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """ConViT's forward written out: [CLS] is concatenated before block local_up_to_layer.

    Returns per block ``(input, output)``.
    """
    x = model.patch_embed(images) + model.pos_embed
    states = []
    for index, block in enumerate(model.blocks):
        if index == model.local_up_to_layer:
            x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], 1)
        states.append((x, block(x)))
        x = states[-1][1]
    return states


def test_convit_identifiability_reports_cls_only_where_it_is(tiny_timm):
    model = tiny_timm("convit_tiny")
    images = tiny_images()
    result = class_identifiability(model, images, LABELS)
    with torch.no_grad():
        states = convit_states(model, images)
        torch.testing.assert_close(model.head(model.norm(states[-1][1])[:, 0]), model(images))
    joins = model.local_up_to_layer
    for block, (_, tokens) in enumerate(states):
        with torch.no_grad():
            logits = model.head(model.norm(tokens))
        torch.testing.assert_close(
            result.token_rate[block], image_top1_rate(logits[:, -16:], LABELS)
        )
        if block < joins:  # token 0 is an image token here: no [CLS] statistics
            assert torch.isnan(result.cls_rate[block]) and torch.isnan(result.cls_rank[block])
        else:
            want = (logits[:, 0].argmax(-1) == LABELS).float().mean() * 100
            torch.testing.assert_close(result.cls_rate[block], want)
    assert result.to_dict()["cls_rate"][0] is None


def test_convit_refuses_blocks_without_cls_and_reads_those_with_it(tiny_timm):
    model = tiny_timm("convit_tiny")
    images = tiny_images()
    joins = model.local_up_to_layer
    for method in (AttentionRollout, CheferRollout, ClassSpaceAttentionGradient):
        with pytest.raises(UnsupportedModelError, match=f"joins the tokens at block {joins}"):
            method(model)
    with torch.no_grad():
        states = convit_states(model, images)
        probs = [
            attention_by_hand(block.attn, block.norm1(states[index][0]))[0]
            for index, block in enumerate(model.blocks)
            if index >= joins
        ]
    got = AttentionRollout(model, start_layer=joins).attribute(images)
    torch.testing.assert_close(got, rollout_by_hand(probs)[:, 0, 1:].reshape(3, 1, 4, 4))
    got = RawAttention(model).attribute(images)
    torch.testing.assert_close(got, probs[-1].mean(1)[:, 0, 1:].reshape(3, 1, 4, 4))


def test_convit_gradient_map_on_the_blocks_with_cls(tiny_timm):
    model = tiny_timm("convit_tiny")
    images = tiny_images()
    joins, depth = model.local_up_to_layer, len(model.blocks)
    with torch.no_grad():
        states = convit_states(model, images)
    want = torch.zeros(3, 16)
    for index in range(joins, depth):
        block = model.blocks[index]
        probs, out = attention_by_hand(block.attn, block.norm1(states[index][0]), leaf_probs=True)
        loss = F.cross_entropy(model.head(model.norm(out[:, 0])), TARGET, reduction="sum")
        (grad,) = torch.autograd.grad(loss, probs)
        want -= grad[:, :, 0, 1:].sum(1)
    got = ClassSpaceAttentionGradient(model, layer=list(range(joins, depth)))
    torch.testing.assert_close(got.attribute(images, TARGET), want.reshape(3, 1, 4, 4))


@pytest.mark.parametrize("architecture", ["cait_xxs24_224", "xcit_nano_12_p8_224"])
def test_class_attention_models_read_image_tokens_and_report_no_cls(tiny_timm, architecture):
    model = tiny_timm(architecture)
    images = tiny_images()
    with torch.no_grad():  # timm's own intermediate states: image tokens only
        states = model.forward_intermediates(
            images, norm=False, output_fmt="NLC", intermediates_only=True
        )
    maps = ClassSpaceSaliency(model, layer="all", per_layer=True).attribute(images, TARGET)
    result = class_identifiability(model, images, LABELS)
    for block, tokens in enumerate(states):
        with torch.no_grad():
            logits = model.head(model.norm(tokens))
        torch.testing.assert_close(maps[:, block : block + 1], target_maps(logits))
        torch.testing.assert_close(result.token_rate[block], image_top1_rate(logits, LABELS))
    assert result.cls_rank is None and result.cls_rate is None
    layer = model.blocks[-1].norm1
    want = captum_gradcam_on_tokens(model, layer, images, TARGET, 0, (4, 4))
    torch.testing.assert_close(GradCAM(model).attribute(images, TARGET), want)


@pytest.mark.parametrize("architecture", ["cait_xxs24_224", "xcit_nano_12_p8_224"])
def test_class_attention_components_by_hand(tiny_timm, architecture):
    model = tiny_timm(architecture)
    images = tiny_images()
    xcit = architecture.startswith("xcit")
    with torch.no_grad(), block_inputs(model.blocks) as inputs:
        outputs = model.forward_intermediates(
            images, norm=False, output_fmt="NLC", intermediates_only=True
        )
    maps = {
        component: ClassSpaceSaliency(
            model, component=component, layer="all", per_layer=True
        ).attribute(images, TARGET)
        for component in ("attention", "mlp")
    }
    for index, (block, args) in enumerate(zip(model.blocks, inputs, strict=True)):
        x = args[0]
        with torch.no_grad():
            gamma1, gamma2 = (
                (block.gamma1, block.gamma2) if xcit else (block.gamma_1, block.gamma_2)
            )
            attention = gamma1 * block.attn(block.norm1(x))
            mid = x + attention
            if xcit:  # XCiT's third branch: local patch interaction on the (H, W) grid
                mid = mid + block.gamma3 * block.local_mp(block.norm3(mid), *args[1:])
            mlp = gamma2 * block.mlp(block.norm2(mid))
            torch.testing.assert_close(mid + mlp, outputs[index])
            for component, branch in (("attention", attention), ("mlp", mlp)):
                want = target_maps(model.head(model.norm(branch)))
                got = maps[component][:, index : index + 1]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["cait_xxs24_224", "xcit_nano_12_p8_224"])
def test_class_attention_models_refuse_cls_methods_with_the_reason(tiny_timm, architecture):
    model = tiny_timm(architecture)
    for name in ("rollout", "chefer", "raw_attention"):
        with pytest.raises(UnsupportedModelError, match="class-attention blocks"):
            create_method(name, model)
    with pytest.raises(UnsupportedModelError, match="joins only after its last block"):
        ClassSpaceAttentionGradient(model)
    with pytest.raises(UnsupportedModelError, match="class-attention blocks"):
        find_token_path(model)


def test_token_counts_are_checked_against_the_patch_grid(tiny_vit):
    model = tiny_vit("plain")  # one prefix token; a custom anatomy that claims two
    anatomy = ViTAnatomy.from_model(model, num_prefix_tokens=2)
    with pytest.raises(ValueError, match="holds 17 tokens, but 2 prefix tokens"):
        class_identifiability(anatomy, tiny_images(), LABELS)


# ---------------------------------------------------------------- hybrids and I-JEPA
@pytest.mark.parametrize("architecture", ["vitamin_small_224", "vit_tiny_r_s16_p8_224"])
def test_hybrid_embeddings_have_one_token_per_16_pixels(tiny_timm, architecture):
    model = tiny_timm(architecture)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # timm's own states and grid: 4x4 tokens for 64x64 inputs
        (spatial,) = model.forward_intermediates(images, indices=1, intermediates_only=True)
        tokens = model.forward_intermediates(
            images, norm=False, output_fmt="NLC", intermediates_only=True
        )[-1]
        want = target_maps(model.head(model.fc_norm(model.norm(tokens))))
    assert spatial.shape[-2:] == (4, 4)
    torch.testing.assert_close(ClassSpaceSaliency(model).attribute(images, TARGET), want)
    torch.testing.assert_close(SobelSaliency(model).attribute(images), sobel_by_hand(images, 16))


@pytest.fixture
def hf_ijepa(tiny_hf_vit):
    return tiny_hf_vit("ijepa")


def test_ijepa_has_no_cls_and_averages_all_tokens(hf_ijepa):
    model, images = hf_ijepa, tiny_images()
    with torch.no_grad():  # on a copy: transformers leaves output-recording hooks behind
        hidden = copy.deepcopy(model)(images, output_hidden_states=True).hidden_states[1:]
        head = model.classifier
        norm = model.base_model.layernorm
        torch.testing.assert_close(head(norm(hidden[-1]).mean(1)), model(images).logits)
    maps = ClassSpaceSaliency(model, layer="all", per_layer=True).attribute(images, TARGET)
    result = class_identifiability(model, images, LABELS)
    for block, tokens in enumerate(hidden):
        with torch.no_grad():
            logits = head(norm(tokens))  # all 16 tokens are image tokens
        torch.testing.assert_close(maps[:, block : block + 1], target_maps(logits))
        torch.testing.assert_close(result.token_rate[block], image_top1_rate(logits, LABELS))
    assert result.cls_rank is None
    path = find_token_path(model)
    with torch.no_grad():
        torch.testing.assert_close(path.classify(path.embed(images)), model(images).logits)


def test_data2vec_vision_refuses_attention_and_token_removal_with_the_reason(tiny_hf_vit):
    model, images = tiny_hf_vit("data2vec_vision"), tiny_images()
    before = model_state(model)
    for name in ("rollout", "chefer", "raw_attention"):
        with pytest.raises(UnsupportedModelError, match="fixes its attention implementation"):
            create_method(name, model)
    with pytest.raises(UnsupportedModelError, match="patch grid and a relative position bias"):
        find_token_path(model)
    with torch.no_grad():
        hidden = copy.deepcopy(model)(images, output_hidden_states=True).hidden_states[-1]
        base = model.base_model
        logits = model.classifier(base.pooler.layernorm(base.layernorm(hidden[:, 1:])))
    torch.testing.assert_close(
        ClassSpaceSaliency(model).attribute(images, TARGET), target_maps(logits)
    )
    assert_state_unchanged(model, before)


# ---------------------------------------------------------------- attention that is not read
def test_differential_attention_is_refused(tiny_timm):
    if not timm.is_model("vit_dlittle_patch16_reg1_gap_256"):
        pytest.skip("this timm release has no differential-attention ViT")
    model = tiny_timm("vit_dlittle_patch16_reg1_gap_256")
    for name in ("rollout", "chefer", "raw_attention"):
        with pytest.raises(UnsupportedModelError, match="difference of two softmaxes"):
            create_method(name, model)


def test_parallel_blocks_refuse_components_and_explain_in_norm(tiny_timm):
    model = tiny_timm("vit_base_patch16_xp_224")
    images = tiny_images()
    with pytest.raises(UnsupportedModelError, match="no recognised attention/MLP branch"):
        ClassSpaceSaliency(model, component="attention").attribute(images, TARGET)
    layer = model.blocks[-1].in_norm  # feeds the fused attention + MLP projection
    want = captum_gradcam_on_tokens(model, layer, images, TARGET, 1, (4, 4))
    torch.testing.assert_close(GradCAM(model).attribute(images, TARGET), want)


def test_torchvision_conv_stem():
    from torchvision.models.vision_transformer import ConvStemConfig

    torch.manual_seed(0)
    stem = [ConvStemConfig(out_channels=16, kernel_size=3, stride=2) for _ in range(3)]
    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=7,
        conv_stem_configs=stem,
    )
    model = perturb_weights(model)
    images = tiny_images()
    with torch.no_grad():
        x = model._process_input(images)  # the conv stem, then tokens
        x = torch.cat([model.class_token.expand(3, -1, -1), x], 1) + model.encoder.pos_embedding
        x = model.encoder.layers(x)
        want = target_maps(model.heads(model.encoder.ln(x[:, 1:])))
    torch.testing.assert_close(ClassSpaceSaliency(model).attribute(images, TARGET), want)
    assert math.prod(want.shape[-2:]) == 16
