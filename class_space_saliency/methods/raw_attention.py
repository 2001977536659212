"""Raw attention: the last block's attention from the rows the head reads, mean over heads."""

from __future__ import annotations

import torch
from torch import nn

from ._attention import check_attention_support, fuse_heads, image_token_row, record_attention
from .base import SaliencyMethod, tokens_to_grid


class RawAttention(SaliencyMethod):
    """The attention of [CLS] to each image token in one block, mean over heads.

    Class-agnostic: ``target`` is validated and otherwise ignored. Pooled models (with or
    without [CLS] or registers) get the mean over the image-token query rows instead (see
    :func:`~class_space_saliency.methods._attention.image_token_row`).

    Args:
        model: A supported timm or torchvision ViT.
        layer: The block whose attention is read (default the last, ``-1``).
        **anatomy_overrides: Parts of a custom model (see ``ViTAnatomy.from_model``).

    Returns:
        ``attribute`` returns float32 maps (B, 1, h, w).

    Example:
        >>> maps = RawAttention(model).attribute(images)  # (B, 1, h, w)
    """

    cost = "forward only"

    def __init__(self, model: nn.Module, layer: int = -1, **anatomy_overrides) -> None:
        super().__init__(model, **anatomy_overrides)
        check_attention_support(type(self).__name__, self.anatomy, model)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int block index, got {layer!r}")
        self.layer = self.anatomy.resolve_layers(layer)[0]

    def _attribute(
        self, inputs: torch.Tensor, target: torch.Tensor | None, grid: tuple[int, int]
    ) -> torch.Tensor:
        (attention,) = record_attention(self.anatomy, inputs, [self.layer])
        row = image_token_row(fuse_heads(attention, "mean"), self.anatomy)
        return tokens_to_grid(row, grid).unsqueeze(1)
