"""Which tokens the head reads, and layer scale: pooled timm ViTs (with [CLS], with registers),
BEiT and EVA-02, against a hand-written forward that never assumes token 0 is [CLS].

The reference below re-implements every block (attention with BEiT's relative position bias
and EVA-02's rotary embeddings, layer scale ``gamma_1``/``gamma_2`` or ``ls1``/``ls2``) and the
head's readout, written out per family in ``READS``; its logits must equal the model's own.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from conftest import NUM_CLASSES, TINY, _eval, assert_state_unchanged, model_state
from test_swin_and_controls import sobel_by_hand
from timm.layers import apply_rot_embed_cat
from timm.models.beit import Beit
from timm.models.eva import Eva
from torch import nn

from class_space_saliency import (
    AttentionRollout,
    CheferRollout,
    ClassSpaceAttentionGradient,
    ClassSpaceSaliency,
    GradCAM,
    RawAttention,
    SobelSaliency,
    class_identifiability,
)
from class_space_saliency.adapters import UnsupportedModelError
from class_space_saliency.evaluation.curves import check_token_model, perturbation_curves
from class_space_saliency.evaluation.protocols import PROTOCOLS

READS = {
    # family: ("mean", first pooled token) or ("row", token) -- from each model's forward_head
    "avgcls": ("mean", 1),  # [CLS] kept but never read: mean of the 16 image tokens
    "reg4gap": ("mean", 4),  # token 0 is a register
    "beit": ("mean", 1),  # timm BEiT default global_pool="avg"
    "eva02": ("mean", 1),
    "beit_token": ("row", 0),
}
FAMILIES = list(READS)
TARGET = torch.tensor([0, 4, 6])


def make(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "avgcls":
        model = timm.create_model(
            "vit_tiny_patch16_224", global_pool="avg", init_values=0.5, **TINY
        )
    elif family == "reg4gap":
        kwargs = dict(TINY, reg_tokens=4, global_pool="avg", class_token=False)
        model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    elif family == "beit":
        model = timm.create_model("beit_base_patch16_224", init_values=0.5, **TINY)
    elif family == "beit_token":
        model = timm.create_model(
            "beit_base_patch16_224", init_values=0.5, global_pool="token", **TINY
        )
    else:
        model = timm.create_model("eva02_tiny_patch14_224", init_values=0.5, **TINY)
    return _eval(model)


def images_for(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def read(family: str, values: torch.Tensor) -> torch.Tensor:
    """The rows of (B, N, ...) the head reads, from ``READS``."""
    kind, index = READS[family]
    return values[:, index] if kind == "row" else values[:, index:].mean(1)


def prefix(family: str) -> int:
    return {"reg4gap": 4}.get(family, 1)


def attention(attn: nn.Module, h: torch.Tensor, rope, npt: int):
    """Probabilities (B, heads, N, N) and output of one attention module, by hand."""
    b, n, d = h.shape
    bias = attn.qkv.bias
    if getattr(attn, "q_bias", None) is not None:
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
    qkv = F.linear(h, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:  # EVA-02: rotary embedding of the image tokens only
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope)], 2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope)], 2)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if getattr(attn, "relative_position_bias_table", None) is not None:  # BEiT
        scores = scores + attn._get_rel_pos_bias()
    probs = scores.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, d)
    return probs, attn.proj(getattr(attn, "norm", nn.Identity())(out))


def scaled(block: nn.Module, number: int, value: torch.Tensor) -> torch.Tensor:
    """Layer scale: BEiT/EVA ``gamma_k`` parameters, timm ``ls_k`` modules."""
    gamma = getattr(block, f"gamma_{number}", None)
    if gamma is not None:
        return gamma * value
    return getattr(block, f"ls{number}", nn.Identity())(value)


def forward(model: nn.Module, family: str, images: torch.Tensor, leaf_block: int | None = None):
    """Hand-written forward: per-block states and probabilities, logits, optional leaf."""
    x = model.patch_embed(images)
    rope = None
    if isinstance(model, Beit):
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], 1)
    elif isinstance(model, Eva):
        x, rope = model._pos_embed(x)
    else:
        x = model._pos_embed(x)
    out = {"residual": [], "attention": [], "mlp": [], "probs": [], "leaf": None}
    for i, block in enumerate(model.blocks):
        h = block.norm1(x)
        if i == leaf_block:
            h = out["leaf"] = h.detach().requires_grad_(True)
        probs, attn = attention(block.attn, h, rope, prefix(family))
        attn = scaled(block, 1, attn)
        x = x + attn
        mlp = scaled(block, 2, block.mlp(block.norm2(x)))
        x = x + mlp
        for key, value in zip(
            ("residual", "attention", "mlp", "probs"), (x, attn, mlp, probs), strict=False
        ):
            out[key].append(value)
    out["logits"] = model.head(model.fc_norm(read(family, model.norm(x))))
    return out


def project(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model.head(model.fc_norm(model.norm(tokens)))


def maps(rows: torch.Tensor) -> torch.Tensor:
    return rows.reshape(rows.shape[0], 1, 4, 4)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def test_reference_forward_is_the_model(family):
    model = make(family)
    with torch.no_grad():
        torch.testing.assert_close(
            forward(model, family, images_for())["logits"], model(images_for())
        )


@pytest.mark.parametrize("component", ["residual", "attention", "mlp"])
def test_class_space_components_apply_layer_scale(family, component):
    model = make(family)
    images = images_for()
    with torch.no_grad():
        states = forward(model, family, images)[component]
    explainer = ClassSpaceSaliency(model, component=component, layer="all")
    got = explainer.attribute(images, TARGET, per_layer=True)
    for block, tokens in enumerate(states):
        logits = project(model, tokens[:, prefix(family) :])
        want = logits[torch.arange(3), :, TARGET]
        torch.testing.assert_close(got[:, block], want.reshape(3, 4, 4), rtol=1e-4, atol=1e-5)


def test_rollout_and_raw_attention_read_the_heads_rows(family):
    model = make(family)
    images = images_for()
    with torch.no_grad():
        probs = forward(model, family, images)["probs"]
    rolled = torch.eye(probs[0].shape[-1])
    for p in probs:
        a = p.mean(1) + torch.eye(p.shape[-1])
        rolled = (a / a.sum(-1, keepdim=True)) @ rolled
    npt = prefix(family)
    want = maps(read(family, rolled)[:, npt:])
    torch.testing.assert_close(
        AttentionRollout(model).attribute(images), want, rtol=1e-4, atol=1e-6
    )
    want = maps(read(family, probs[-1].mean(1))[:, npt:])
    torch.testing.assert_close(RawAttention(model).attribute(images), want, rtol=1e-4, atol=1e-6)


def test_chefer_reads_the_heads_rows(family):
    model = make(family)
    images = images_for()
    out = forward(model, family, images)
    score = out["logits"][torch.arange(3), TARGET].sum()
    grads = torch.autograd.grad(score, out["probs"])
    relevance = torch.eye(out["probs"][0].shape[-1]).repeat(3, 1, 1)
    for p, g in zip(out["probs"], grads, strict=True):
        relevance = relevance + (g * p).clamp(min=0).mean(1) @ relevance
    want = maps(read(family, relevance.detach())[:, prefix(family) :])
    before = model_state(model)
    got = CheferRollout(model).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert_state_unchanged(model, before)


def test_gradcam_on_the_last_norm1(family):
    model = make(family)
    images = images_for()
    out = forward(model, family, images, leaf_block=2)
    (grad,) = torch.autograd.grad(out["logits"][torch.arange(3), TARGET].sum(), out["leaf"])
    npt = prefix(family)
    cam = (grad[:, npt:].mean(1, keepdim=True) * out["leaf"][:, npt:]).sum(-1).clamp(min=0)
    got = GradCAM(model).attribute(images, TARGET)
    torch.testing.assert_close(got, maps(cam.detach()), rtol=1e-4, atol=1e-6)


def test_class_space_gradient_needs_a_cls_that_the_head_reads(family):
    model = make(family)
    if READS[family][0] == "mean":
        with pytest.raises(UnsupportedModelError, match="needs a \\[CLS\\] token that the"):
            ClassSpaceAttentionGradient(model)
        return
    images = images_for()
    out = forward(model, family, images)
    total = 0.0
    for attn, probs in zip(out["attention"], out["probs"], strict=True):
        loss = F.cross_entropy(project(model, attn[:, 0]), TARGET, reduction="sum")
        (grad,) = torch.autograd.grad(loss, probs, retain_graph=True)
        total = total - grad[:, :, 0, 1:].sum(1)
    got = ClassSpaceAttentionGradient(model).attribute(images, TARGET)
    torch.testing.assert_close(got, maps(total.detach()), rtol=1e-4, atol=1e-5)


def test_identifiability_reports_cls_only_for_a_read_cls(family):
    model = make(family)
    images = images_for(4)
    labels = torch.tensor([0, 1, 2, 3])
    result = class_identifiability(model, images, labels)
    with torch.no_grad():
        last = project(model, forward(model, family, images)["residual"][-1])
    image_top1 = (last[:, prefix(family) :].argmax(-1) == labels[:, None]).float().mean() * 100
    torch.testing.assert_close(result.token_rate[-1], image_top1)
    if READS[family][0] == "mean":
        assert result.cls_rank is None and result.cls_rate is None
    else:
        want = (last[:, 0].argmax(-1) == labels).float().mean() * 100
        torch.testing.assert_close(result.cls_rate[-1], want)


def test_gradcam_equals_captum_on_beit():
    """Captum's LayerGradCam on the same reshaped layer (an independent implementation)."""
    model = make("beit")
    images = images_for()
    probe = nn.Identity()
    layer = model.blocks[1].norm1

    def reshape(module, args, out):
        image = probe(out[:, 1:].permute(0, 2, 1).reshape(3, -1, 4, 4))
        return torch.cat([out[:, :1], image.flatten(2).permute(0, 2, 1)], 1)

    handle = layer.register_forward_hook(reshape)
    try:
        want = LayerGradCam(model, probe).attribute(images, TARGET, relu_attributions=True)
    finally:
        handle.remove()
    got = GradCAM(model, layer=layer).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert NUM_CLASSES == 7


@pytest.mark.parametrize("family", ["beit", "eva02"])
def test_token_removal_refuses_position_inside_attention(family):
    with pytest.raises(TypeError, match="position information inside attention"):
        check_token_model(make(family))


def test_controls_on_the_patch_grid(family):
    images = images_for()
    want = sobel_by_hand(images, 8)
    torch.testing.assert_close(SobelSaliency(make(family)).attribute(images), want)


@pytest.mark.parametrize("family", ["avgcls", "reg4gap"])
def test_token_removal_on_pooled_models_equals_masked_keys_and_mean(family):
    """Removing image tokens = masking them as attention keys and leaving them out of the mean."""
    model = make(family)
    images = images_for()
    saliency = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    protocol = dataclasses.replace(PROTOCOLS["vilas2023/positive"], score="logit")
    _, curves = perturbation_curves(
        model, images, saliency, TARGET, protocol, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    npt = prefix(family)
    order = saliency.flatten(1).argsort(dim=1, descending=True, stable=True)
    for step, removed in enumerate(range(1, 16)):
        keep = torch.ones(3, npt + 16, dtype=torch.bool)
        keep.scatter_(1, order[:, :removed] + npt, False)
        mask = keep[:, None, None, :].expand(-1, 1, npt + 16, -1)
        with torch.no_grad():
            tokens = model.forward_features(images, attn_mask=mask)[:, npt:]
            kept = keep[:, npt:, None].float()
            pooled = (tokens * kept).sum(1) / kept.sum(1)
            want = model.head(model.fc_norm(pooled))[torch.arange(3), TARGET]
        torch.testing.assert_close(curves[:, step], want, atol=1e-5, rtol=1e-4)
