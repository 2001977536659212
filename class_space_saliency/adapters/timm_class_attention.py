"""timm ``Cait`` and ``Xcit``: the [CLS] joins only in class-attention blocks after ``blocks``.

Both run ``blocks`` on image tokens alone; then class-attention blocks (CaiT
``blocks_token_only``, XCiT ``cls_attn_blocks``) let a [CLS] token attend to them, and the
head reads that [CLS]. The class space of the image tokens of ``blocks`` is read as for any
ViT (the final ``norm`` and the head); no block of ``blocks`` holds the [CLS], so
identifiability has no [CLS] statistics, and methods that need the [CLS] row of every block
(rollout, Chefer, raw attention, the gradient maps) refuse. XCiT's blocks attend across
channels (cross-covariance attention) and add a third branch (local patch interaction,
``gamma3``); its layer scales are ``gamma1`` / ``gamma2``.
"""

from __future__ import annotations

from torch import nn

from . import timm_vit
from .base import UnsupportedModelError, first_conv_in_channels, pair, timm_block_parts

NAME = "timm CaiT/XCiT"
LOOKS_FOR = "a timm Cait or Xcit (blocks, then class-attention blocks, norm, head)"
ATTENTION_REASON = {
    "Cait": "CaiT's [CLS] joins only in its class-attention blocks (blocks_token_only), after "
    "every block whose attention could be read, and its talking-heads attention mixes heads "
    "after the softmax",
    "Xcit": "XCiT's blocks attend across channels (cross-covariance attention), not across "
    "tokens, and its [CLS] joins only in its class-attention blocks (cls_attn_blocks)",
}


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``Cait`` or ``Xcit``."""
    from timm.models.cait import Cait
    from timm.models.xcit import Xcit

    return isinstance(model, Cait | Xcit)


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a timm CaiT / XCiT: ``blocks`` (image tokens only)."""
    kind = type(model).__name__
    if model.global_pool != "token":
        raise UnsupportedModelError(
            f"{kind} with global_pool={model.global_pool!r} pools the tokens that leave its "
            "class-attention blocks, not the tokens of its blocks; class-space projection "
            "supports its [CLS] head (global_pool='token')"
        )
    heads = timm_vit.heads_of(model)
    blocks = list(model.blocks)
    patch_embed = model.patch_embed
    scales = ("gamma1", "gamma2") if kind == "Xcit" else ("gamma_1", "gamma_2")
    return dict(
        family=NAME,
        blocks=blocks,
        norm=model.norm,
        heads=heads,
        readout=timm_vit.readout(model, heads),
        num_prefix_tokens=1,
        prefix_from_block=len(blocks),
        patch_size=pair(patch_embed.patch_size),
        img_size=pair(patch_embed.img_size),
        in_chans=first_conv_in_channels(patch_embed),
        attention_modules=None,
        attention_reason=ATTENTION_REASON[kind],
        token_path=f"{kind} adds its [CLS] token in class-attention blocks after its blocks",
        **timm_block_parts(blocks, stem=None, scale_parameters=scales),
    )
