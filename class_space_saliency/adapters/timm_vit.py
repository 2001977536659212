"""timm ``VisionTransformer`` and its kin (DeiT distilled, registers, pooled heads).

Duck-typed on ``blocks``, ``norm``, ``head``, ``patch_embed`` and ``num_prefix_tokens``, so
timm-style custom ViTs are found too. BEiT/EVA have their own adapter (:mod:`.timm_eva`).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Readout, TokenPath, UnsupportedModelError, block_branches, pair

NAME = "timm ViT"
LOOKS_FOR = "a timm VisionTransformer (blocks, norm/fc_norm, head, num_prefix_tokens, patch_embed)"
_NEEDED = ("blocks", "norm", "head", "patch_embed", "num_prefix_tokens")
TOKEN_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens")
"""What token removal needs of a timm-style ViT."""


def matches(model: nn.Module) -> bool:
    """Whether ``model`` looks like a timm ViT."""
    return all(hasattr(model, name) for name in _NEEDED)


def readout(model: nn.Module, heads: tuple[nn.Module, ...]) -> Readout:
    """The rows a timm ViT's head reads, from its ``global_pool``.

    Raises:
        UnsupportedModelError: For pooling that is not a mean or a token (``max``,
            ``avgmax``, attention pooling, none).
    """
    pool = getattr(model, "global_pool", "token")
    prefix = int(model.num_prefix_tokens)
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


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a timm ViT."""
    heads = heads_of(model)
    patch_embed = model.patch_embed
    blocks = list(model.blocks)
    attention = [getattr(b, "attn", None) for b in blocks]
    usable = all(m is not None and hasattr(m, "attn_drop") for m in attention)
    return dict(
        family=NAME,
        blocks=blocks,
        norm=nn.Sequential(model.norm, getattr(model, "fc_norm", nn.Identity())),
        heads=heads,
        readout=readout(model, heads),
        num_prefix_tokens=int(model.num_prefix_tokens),
        patch_size=pair(patch_embed.patch_size),
        img_size=None if getattr(model, "dynamic_img_size", False) else pair(patch_embed.img_size),
        dynamic_pad=bool(getattr(patch_embed, "dynamic_img_pad", False)),
        in_chans=getattr(getattr(patch_embed, "proj", None), "in_channels", None),
        attention_modules=attention if usable else None,
        attention_kind="timm",
        pre_attention_norms=[getattr(b, "norm1", None) for b in blocks],
        token_path=token_path(model),
        **block_branches(blocks, "attn", "mlp"),
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
