"""Raw attention: the last block's attention from the rows the head reads, mean over heads."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._attention import check_blocks_hold_prefix, fuse_heads, image_token_row, record_attention
from .base import MethodOptions, SaliencyMethod, tokens_to_grid
from .registry import register_method


@dataclass(frozen=True)
class RawAttentionOptions(MethodOptions):
    """Options of :class:`RawAttention`.

    Attributes:
        layer: The block whose attention is read (default the last, ``-1``).
    """

    layer: int = -1

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"layer must be an int block index, got {self.layer!r}")


@register_method("raw_attention", class_specific=False, needs_attention=True)
class RawAttention(SaliencyMethod):
    """The attention of [CLS] to each image token in one block, mean over heads.

    Class-agnostic: ``target`` is validated and otherwise ignored. Pooled models (with or
    without [CLS] or registers) get the mean over the image-token query rows instead (see
    :func:`~class_space_saliency.methods._attention.image_token_row`).

    Args:
        model: A supported timm or torchvision ViT.
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: :class:`RawAttentionOptions` (``layer``), ``class_names`` and parts
            of a custom model.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                           depth=2, num_classes=5)
        >>> RawAttention(model).attribute(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 1, 4, 4])
    """

    Options = RawAttentionOptions

    def _resolve_options(self, options: RawAttentionOptions) -> RawAttentionOptions:
        layer = self.anatomy.resolve_layers(options.layer)[0]
        check_blocks_hold_prefix("RawAttention", self.anatomy, self.model, layer, "layer")
        return replace(options, layer=layer)

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: RawAttentionOptions,
    ) -> torch.Tensor:
        (attention,) = record_attention(self.anatomy, inputs, [options.layer])
        row = image_token_row(fuse_heads(attention, "mean"), self.anatomy)
        return tokens_to_grid(row, grid).unsqueeze(1)
