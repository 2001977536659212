"""timm ``Beit`` and ``Eva`` (EVA, EVA-02): layer scale in ``gamma_1`` / ``gamma_2``.

Their attention/MLP branches are the ``attn`` / ``mlp`` outputs times the block's
``gamma_1`` / ``gamma_2`` parameters (post-norm ``EvaBlockPostNorm``: ``norm1(attn(x))``,
``norm2(mlp(x))``); position information lives inside attention (relative position bias,
rotary embeddings), so tokens cannot be removed from their sequences.
"""

from __future__ import annotations

from torch import nn

from . import timm_vit
from .base import pair, timm_block_parts

NAME = "timm BEiT/EVA"
LOOKS_FOR = "a timm Beit or Eva (blocks with gamma_1/gamma_2, norm, fc_norm, head)"


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``Beit`` or ``Eva``."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva

    return isinstance(model, Beit | Eva)


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a timm BEiT / EVA."""
    heads = timm_vit.heads_of(model)
    blocks = list(model.blocks)
    patch_embed = model.patch_embed
    attention, reason = timm_vit.attention_of(blocks)
    return dict(
        family=NAME,
        blocks=blocks,
        norm=nn.Sequential(model.norm, model.fc_norm),
        heads=heads,
        readout=timm_vit.readout(model, heads),
        num_prefix_tokens=int(model.num_prefix_tokens),
        patch_size=pair(patch_embed.patch_size),
        img_size=None if getattr(model, "dynamic_img_size", False) else pair(patch_embed.img_size),
        dynamic_pad=bool(getattr(patch_embed, "dynamic_img_pad", False)),
        in_chans=timm_vit.in_channels(patch_embed),
        attention_modules=attention,
        attention_kind="timm",
        attention_reason=reason,
        token_path=f"{type(model).__name__} keeps position information inside attention "
        "(relative position bias or rotary embeddings), which removed tokens would misalign",
        **timm_block_parts(blocks, stem=getattr(model, "norm_pre", None)),
    )
