"""Which models the interventions (knock-outs, patching) can edit, and where their [CLS] is."""

from __future__ import annotations

from torch import nn

from ..adapters import UnsupportedModelError, hf, timm_eva, timm_vit
from ..anatomy import ViTAnatomy
from .identifiability import _as_anatomy

EDITABLE_FAMILIES = (timm_vit.NAME, timm_eva.NAME, hf.NAME)
"""Model families whose attention probabilities and activations can be edited."""

_WHY_NOT = {
    "torchvision ViT": "nn.MultiheadAttention computes its probabilities and their weighted "
    "sum in one call, with no place to edit them in between",
    "CLIP zero-shot": "open_clip's nn.MultiheadAttention computes its probabilities and their "
    "weighted sum in one call, with no place to edit them in between",
    "Swin": "its attention runs in shifted windows, not over one sequence of [CLS] and patch "
    "tokens",
    "custom": "a hand-described anatomy does not say how its attention computes probabilities",
}


def editable_anatomy(model: nn.Module | ViTAnatomy) -> ViTAnatomy:
    """The anatomy of a model whose attention and activations can be edited."""
    anatomy = _as_anatomy(model)
    if anatomy.family not in EDITABLE_FAMILIES:
        reason = _WHY_NOT.get(anatomy.family, "its attention is not supported")
        raise UnsupportedModelError(
            f"attention interventions support {', '.join(EDITABLE_FAMILIES)} models; "
            f"{type(anatomy.model).__name__} ({anatomy.family}) is not supported: {reason}"
        )
    if anatomy.attention_modules is None:
        raise UnsupportedModelError(
            f"attention interventions need the attention modules of {type(anatomy.model).__name__}:"
            f" {anatomy.attention_reason or 'its blocks have no attention with attn_drop'}"
        )
    return anatomy


def class_token_index(anatomy: ViTAnatomy) -> int | None:
    """Position of the [CLS] token (0 in timm and Hugging Face ViTs), or ``None`` if none.

    Pooled heads keep a [CLS] token they do not read (timm ``global_pool="avg"`` with a class
    token, Hugging Face BEiT); register-only models have none.
    """
    if anatomy.num_prefix_tokens == 0:
        return None
    if anatomy.readout.cls_index is not None:
        return anatomy.readout.cls_index
    model = anatomy.model
    owner = getattr(getattr(model, "base_model", model), "embeddings", model)
    return 0 if getattr(owner, "cls_token", None) is not None else None
