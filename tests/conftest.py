"""Tiny random-init ViTs of every supported family, and plain-torch reference forwards."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

# Tiny models gain nothing from threads, and competing OpenMP threads slow them badly.
torch.set_num_threads(1)

NUM_CLASSES = 7
TINY = dict(
    pretrained=False,
    img_size=32,
    patch_size=8,
    num_classes=NUM_CLASSES,
    depth=3,
    embed_dim=32,
    num_heads=2,
)


def _eval(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():  # non-trivial weights everywhere (also LayerNorm / biases)
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_model(family: str) -> nn.Module:
    """A tiny random ViT of one supported family (eval mode)."""
    torch.manual_seed(0)
    if family == "plain":
        return _eval(timm.create_model("vit_tiny_patch16_224", init_values=0.5, **TINY))
    if family == "distilled":
        return _eval(timm.create_model("deit_tiny_distilled_patch16_224", **TINY))
    if family == "registers":
        return _eval(timm.create_model("vit_tiny_patch16_224", reg_tokens=4, **TINY))
    if family == "avgpool":
        kwargs = dict(TINY, global_pool="avg", class_token=False, fc_norm=True)
        return _eval(timm.create_model("vit_tiny_patch16_224", **kwargs))
    if family == "dynamic":
        kwargs = dict(TINY, dynamic_img_size=True, patch_size=4)
        return _eval(timm.create_model("vit_tiny_patch16_224", **kwargs))
    if family == "torchvision":
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=3,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=NUM_CLASSES,
        )
        return _eval(model)
    raise ValueError(family)


FAMILIES = ["plain", "distilled", "registers", "avgpool", "dynamic", "torchvision"]


def input_for(family: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = (24, 40) if family == "dynamic" else (32, 32)  # non-square for dynamic models
    return torch.randn(batch, 3, *size, generator=generator)


@torch.no_grad()
def reference_states(model: nn.Module, images: torch.Tensor) -> dict:
    """Token states of every block, recomputed by hand from the model's submodules.

    Returns ``{"residual": [...], "attention": [...], "mlp": [...], "attn_probs": [...]}``
    (lists over blocks of (B, N, D) / (B, heads, N, N)) and ``"logits"`` (the output).
    """
    states = {"residual": [], "attention": [], "mlp": [], "attn_probs": []}
    if isinstance(model, torchvision.models.VisionTransformer):
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + model.encoder.pos_embedding
        for layer in model.encoder.layers:
            mha = layer.self_attention
            h = layer.ln_1(x)
            attn, probs = mha(h, h, h, need_weights=True, average_attn_weights=False)
            x = x + attn
            mlp = layer.mlp(layer.ln_2(x))
            x = x + mlp
            for key, value in zip(states, (x, attn, mlp, probs), strict=True):
                states[key].append(value)
        states["logits"] = model(images)
        return states
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    for block in model.blocks:
        a = block.attn
        h = block.norm1(x)
        b, n, d = h.shape
        qkv = a.qkv(h).reshape(b, n, 3, a.num_heads, d // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
        attn = block.ls1(a.proj((probs @ v).transpose(1, 2).reshape(b, n, d)))
        x = x + attn
        mlp = block.ls2(block.mlp(block.norm2(x)))
        x = x + mlp
        for key, value in zip(states, (x, attn, mlp, probs), strict=True):
            states[key].append(value)
    states["logits"] = model(images)
    return states


def reference_project(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """head(norm(tokens)) by hand: timm norm -> fc_norm -> head(s) averaged; torchvision ln."""
    if isinstance(model, torchvision.models.VisionTransformer):
        return model.heads(model.encoder.ln(tokens))
    normed = model.fc_norm(model.norm(tokens))
    if hasattr(model, "head_dist"):
        return (model.head(normed) + model.head_dist(normed)) / 2
    return model.head(normed)


def prefix_of(model: nn.Module) -> int:
    return 1 if isinstance(model, torchvision.models.VisionTransformer) else model.num_prefix_tokens


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def model_state(model: nn.Module) -> dict:
    """Everything a method must leave untouched."""
    return dict(
        training=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        grads=[p.grad for p in model.parameters()],
        fused=[getattr(m, "fused_attn", None) for m in model.modules()],
        params=[p.detach().clone() for p in model.parameters()],
        hooks=[
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    )


def assert_state_unchanged(model: nn.Module, before: dict) -> None:
    after = model_state(model)
    for key in ("training", "requires_grad", "fused", "hooks"):
        assert after[key] == before[key], key
    assert all(g is None for g in after["grads"])
    for p_before, p_after in zip(before["params"], after["params"], strict=True):
        assert torch.equal(p_before, p_after)
