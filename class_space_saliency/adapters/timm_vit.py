"""timm ``VisionTransformer`` and its kin (DeiT distilled, registers, pooled heads).

Duck-typed on ``blocks``, ``norm``, ``head``, ``patch_embed`` and ``num_prefix_tokens``, so
timm-style custom ViTs are found too. BEiT/EVA have their own adapter (:mod:`.timm_eva`),
and so have ConViT (:mod:`.timm_convit`), CaiT and XCiT (:mod:`.timm_class_attention`).
Post-norm blocks (the GAP model ``vit_base_patch16_rpn_224``) add ``norm1(attn(x))`` and
``norm2(mlp(x))`` to the stream; hybrid patch embeddings (ResNet-ViT hybrids, ViTamin) have
one token per ``feature_ratio x patch_size`` pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import (
    Readout,
    TokenPath,
    UnsupportedModelError,
    first_conv_in_channels,
    pair,
    timm_block_parts,
    token_stride,
)

NAME = "timm ViT"
LOOKS_FOR = "a timm VisionTransformer (blocks, norm/fc_norm, head, num_prefix_tokens, patch_embed)"
_NEEDED = ("blocks", "norm", "head", "patch_embed", "num_prefix_tokens")
TOKEN_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens")
"""What token removal needs of a timm-style ViT."""


def matches(model: nn.Module) -> bool:
    """Whether ``model`` looks like a timm ViT."""
    return all(hasattr(model, name) for name in _NEEDED)


def prefix_tokens(model: nn.Module) -> int:
    """Tokens before the image tokens: ``num_prefix_tokens``, or the [CLS] token where the
    timm release does not declare the count (ConViT, CaiT and XCiT before timm 1.0.31)."""
    count = getattr(model, "num_prefix_tokens", None)
    return int(count) if count is not None else int(getattr(model, "cls_token", None) is not None)


def readout(model: nn.Module, heads: tuple[nn.Module, ...]) -> Readout:
    """The rows a timm ViT's head reads, from its ``global_pool``.

    Raises:
        UnsupportedModelError: For pooling that is not a mean or a token (``max``,
            ``avgmax``, attention pooling, none).
    """
    pool = getattr(model, "global_pool", "token")
    prefix = prefix_tokens(model)
    if pool == "token":
        return Readout(cls_rows=tuple(range(len(heads))))  # DeiT distilled: tokens 0 and 1
    if pool == "avg":
        return Readout(pool_start=0 if getattr(model, "pool_include_prefix", False) else prefix)
    raise UnsupportedModelError(
        f"{type(model).__name__} pools tokens with global_pool={pool!r}; class-space "
        "projection needs a head that reads a token or the mean of tokens ('token' or 'avg')"
    )


def heads_of(model: nn.Module) -> tuple[nn.Module, ...]:
    """``head`` (and ``head_dist`` of distilled models), refusing head-less models."""
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} pools tokens with an attention head (global_pool='map'); "
            "class-space projection needs a linear head on token states"
        )
    heads = [model.head]
    if hasattr(model, "head_dist"):
        heads.append(model.head_dist)
    if any(isinstance(h, nn.Identity) for h in heads):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no classifier head (num_classes=0)"
        )
    return tuple(heads)


DIFFERENTIAL_ATTENTION = (
    "differential attention (timm DiffAttention) weighs values by the difference of two "
    "softmaxes, which are not attention probabilities to read, roll out or weight by gradients"
)


def attention_of(blocks: list[nn.Module]) -> tuple[list[nn.Module] | None, str | None]:
    """The blocks' timm attention modules whose ``attn_drop`` input is the probabilities, or
    ``(None, reason)``."""
    import timm.layers

    attention = [getattr(b, "attn", None) for b in blocks]
    differential = getattr(timm.layers, "DiffAttention", None)  # newer timm releases only
    if differential is not None and any(isinstance(m, differential) for m in attention):
        return None, DIFFERENTIAL_ATTENTION
    if all(m is not None and hasattr(m, "attn_drop") for m in attention):
        return attention, None
    return None, None


def in_channels(patch_embed: nn.Module) -> int | None:
    """Input channels of a timm patch embedding (hybrids: of their CNN backbone)."""
    channels = getattr(patch_embed, "in_chans", None)
    return int(channels) if channels is not None else first_conv_in_channels(patch_embed)


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a timm ViT."""
    heads = heads_of(model)
    patch_embed = model.patch_embed
    blocks = list(model.blocks)
    attention, reason = attention_of(blocks)
    return dict(
        family=NAME,
        blocks=blocks,
        norm=nn.Sequential(model.norm, getattr(model, "fc_norm", nn.Identity())),
        heads=heads,
        readout=readout(model, heads),
        num_prefix_tokens=prefix_tokens(model),
        patch_size=token_stride(patch_embed),
        img_size=None if getattr(model, "dynamic_img_size", False) else pair(patch_embed.img_size),
        dynamic_pad=bool(getattr(patch_embed, "dynamic_img_pad", False)),
        in_chans=in_channels(patch_embed),
        attention_modules=attention,
        attention_kind="timm",
        attention_reason=reason,
        token_path=token_path(model),
        **timm_block_parts(blocks, stem=getattr(model, "norm_pre", None)),
    )


def token_path(model: nn.Module) -> TokenPath | str:
    """Embedding and classification of token sequences, or why there is none."""
    missing = [name for name in TOKEN_PARTS if not hasattr(model, name)]
    if missing:
        return f"it needs a timm-style VisionTransformer, missing {missing}"

    def embed(images: torch.Tensor) -> torch.Tensor:
        tokens = model._pos_embed(model.patch_embed(images))
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise UnsupportedModelError(
                f"token removal is not supported for {type(model).__name__}: _pos_embed must "
                "return one (B, N, D) tensor"
            )
        for name in ("patch_drop", "norm_pre"):
            tokens = getattr(model, name, nn.Identity())(tokens)
        return tokens

    def classify(tokens: torch.Tensor) -> torch.Tensor:
        for block in model.blocks:
            tokens = block(tokens)
        return model.forward_head(model.norm(tokens))

    return TokenPath(embed, classify, int(model.num_prefix_tokens))
