"""Swin Transformers (timm ``SwinTransformer``, Hugging Face ``SwinForImageClassification``).

Swin merges patches between stages and classifies the mean of the last stage's tokens after
the final norm. Its class space is read on that last stage: each token of a last-stage block
is projected through the final norm and the head's linear layer (timm ``head.fc``, Hugging
Face ``classifier``), and maps live on the last stage's grid (stride = patch size x 2 per
merge). Attention is windowed (no token-to-token attention over the image to roll out) and
tokens cannot be removed from a merged sequence: those methods refuse with that reason.
"""

from __future__ import annotations

from torch import nn

from .base import Readout, pair

NAME = "Swin"
LOOKS_FOR = "a timm SwinTransformer or a Hugging Face SwinForImageClassification"
ATTENTION_REASON = (
    "Swin attends within (shifted) local windows, so there is no token-to-token attention "
    "over the whole image to read or roll out; use ClassSpaceSaliency or GradCAM"
)
TOKEN_REASON = "Swin merges patches between stages, so image tokens cannot be removed"


def _is_timm(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def _is_hf(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "swin" and hasattr(model, "classifier")


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a timm or Hugging Face Swin classifier."""
    return _is_timm(model) or _is_hf(model)


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a Swin: the last stage's blocks, final norm, linear head."""
    common = dict(
        family=NAME,
        readout=Readout(pool_start=0),
        num_prefix_tokens=0,
        attention_branches=None,
        attention_modules=None,
        attention_reason=ATTENTION_REASON,
        token_path=TOKEN_REASON,
    )
    if _is_timm(model):
        blocks = list(model.layers[-1].blocks)
        embed = model.patch_embed
        return dict(
            common,
            blocks=blocks,
            norm=model.norm,
            heads=(model.head.fc,),
            patch_size=pair(int(model.feature_info[-1]["reduction"])),
            img_size=None if getattr(model, "dynamic_img_size", False) else pair(embed.img_size),
            in_chans=embed.proj.in_channels,
            mlp_branches=[b.mlp for b in blocks],
            pre_attention_norms=[b.norm1 for b in blocks],
            channels_last=True,
        )
    from .hf import check_transformers, hf_logits

    check_transformers(model)
    config, base = model.config, model.swin
    blocks = list(base.encoder.layers[-1].blocks)
    return dict(
        common,
        blocks=blocks,
        norm=base.layernorm,
        heads=(model.classifier,),
        patch_size=pair(int(config.patch_size) * 2 ** (len(config.depths) - 1)),
        img_size=pair(config.image_size),
        in_chans=int(config.num_channels),
        mlp_branches=[b.mlp for b in blocks],
        pre_attention_norms=[b.layernorm_before for b in blocks],
        output_logits=hf_logits,
    )
