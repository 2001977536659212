"""timm ``ConVit``: [CLS] joins the tokens only before block ``local_up_to_layer``.

ConViT's first ``local_up_to_layer`` blocks (gated positional self-attention) see image
tokens only; the [CLS] token is concatenated in front of the tokens before the next block,
and the head reads it after the last. Everything else is a timm ViT (:mod:`.timm_vit`):
class-space maps and identifiability read each block's own tokens, and methods that follow
the [CLS] row (rollout, Chefer, raw attention, the gradient maps) are limited to the blocks
that hold it.
"""

from __future__ import annotations

from torch import nn

from . import timm_vit

NAME = "timm ConViT"
LOOKS_FOR = "a timm ConVit ([CLS] joins before block local_up_to_layer)"


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``ConVit``."""
    from timm.models.convit import ConVit

    return isinstance(model, ConVit)


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a timm ConViT."""
    joins = min(int(model.local_up_to_layer), len(model.blocks))
    return dict(timm_vit.parts(model), family=NAME, prefix_from_block=joins)
