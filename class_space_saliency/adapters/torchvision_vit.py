"""torchvision ``VisionTransformer``: ``encoder.layers``, ``encoder.ln``, ``heads``."""

from __future__ import annotations

import torch
from torch import nn

from .base import Readout, TokenPath, first_conv_in_channels, pair

NAME = "torchvision ViT"
LOOKS_FOR = "a torchvision VisionTransformer (encoder.layers, encoder.ln, heads)"


def matches(model: nn.Module) -> bool:
    """Whether ``model`` looks like torchvision's ViT."""
    encoder = getattr(model, "encoder", None)
    return (
        encoder is not None
        and all(hasattr(encoder, n) for n in ("layers", "ln"))
        and all(hasattr(model, n) for n in ("heads", "patch_size", "image_size", "conv_proj"))
    )


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a torchvision ViT ([CLS] read by ``heads``)."""
    blocks = list(model.encoder.layers)
    return dict(
        family=NAME,
        blocks=blocks,
        norm=model.encoder.ln,
        heads=(model.heads,),
        readout=Readout(cls_rows=(0,)),
        num_prefix_tokens=1,
        patch_size=pair(model.patch_size),
        img_size=pair(model.image_size),
        in_chans=first_conv_in_channels(model.conv_proj),  # a conv or a conv stem
        attention_branches=[b.self_attention for b in blocks],
        mlp_branches=[b.mlp for b in blocks],
        attention_modules=[b.self_attention for b in blocks],
        attention_kind="mha",
        pre_attention_norms=[b.ln_1 for b in blocks],
        token_path=token_path(model),
    )


def token_path(model: nn.Module) -> TokenPath:
    """Patch embedding + [CLS] + position embedding; encoder layers, ``ln``, ``heads``."""
    encoder = model.encoder

    def embed(images: torch.Tensor) -> torch.Tensor:
        patches = model.conv_proj(images).flatten(2).transpose(1, 2)
        cls = model.class_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], 1) + encoder.pos_embedding

    def classify(tokens: torch.Tensor) -> torch.Tensor:
        tokens = encoder.dropout(tokens)
        for layer in encoder.layers:
            tokens = layer(tokens)
        return model.heads(encoder.ln(tokens)[:, 0])

    return TokenPath(embed, classify, 1)
