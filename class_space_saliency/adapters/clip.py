"""CLIP zero-shot classifiers (:class:`~class_space_saliency.clip.ZeroShotCLIP`, open_clip).

Blocks are ``visual.transformer.resblocks``; a token's class logits are
``logit_scale.exp() * normalise(ln_post(x) @ proj) @ prompts.T`` (the text space); the head
reads [CLS] (``pool_type="tok"``) or the mean of the image tokens (``"avg"``). Attention is
``nn.MultiheadAttention`` (probabilities readable, not differentiable).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Readout, TokenPath, UnsupportedModelError, block_branches, pair

NAME = "CLIP zero-shot"
LOOKS_FOR = "a ZeroShotCLIP (class_space_saliency.models.zero_shot_clip of an open_clip model)"


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`~class_space_saliency.clip.ZeroShotCLIP`."""
    from ..clip import ZeroShotCLIP

    return isinstance(model, ZeroShotCLIP)


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a zero-shot CLIP classifier."""
    visual = model.clip.visual
    pool = getattr(visual, "pool_type", "tok")
    if getattr(visual, "attn_pool", None) is not None or pool not in ("tok", "avg"):
        raise UnsupportedModelError(
            f"this CLIP's visual tower pools with {pool!r} / an attention pooler; class-space "
            "projection needs [CLS] ('tok') or mean ('avg') pooling"
        )
    if not getattr(visual.transformer, "batch_first", False):  # open_clip < 2.26: (L, B, D)
        raise UnsupportedModelError(
            "open_clip transformers that are not batch-first (batch_first=False, or open_clip "
            "releases before 2.26.1, which pass tokens as (L, B, D)) are unsupported: "
            "pip install -U 'open_clip_torch>=2.26.1'"
        )
    blocks = list(visual.transformer.resblocks)
    return dict(
        family=NAME,
        blocks=blocks,
        norm=visual.ln_post,
        heads=(model.head,),
        readout=Readout(cls_rows=(0,)) if pool == "tok" else Readout(pool_start=1),
        num_prefix_tokens=1,
        patch_size=pair(visual.patch_size),
        img_size=pair(visual.image_size),
        in_chans=visual.conv1.in_channels,
        attention_modules=[b.attn for b in blocks],
        attention_kind="mha",
        pre_attention_norms=[b.ln_1 for b in blocks],
        token_path=token_path(model, pool),
        **block_branches(blocks, "attn", "mlp", ("ls_1", "ls_2")),
    )


def token_path(model: nn.Module, pool: str) -> TokenPath:
    """Patch embedding, [CLS], position embedding, ``ln_pre``; blocks, pooling, cosine head."""
    visual = model.clip.visual

    def embed(images: torch.Tensor) -> torch.Tensor:
        patches = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)
        return visual.ln_pre(torch.cat([cls, patches], 1) + visual.positional_embedding)

    def classify(tokens: torch.Tensor) -> torch.Tensor:
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
        after = getattr(visual, "final_ln_after_pool", False)
        tokens = tokens if after else visual.ln_post(tokens)
        pooled = tokens[:, 0] if pool == "tok" else tokens[:, 1:].mean(1)
        return model.head(visual.ln_post(pooled) if after else pooled)

    return TokenPath(embed, classify, 1)
