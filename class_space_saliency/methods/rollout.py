"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .._validation import check_choice
from ._attention import (
    HEAD_FUSIONS,
    check_blocks_hold_prefix,
    fuse_heads,
    image_token_row,
    record_attention,
)
from .base import MethodOptions, SaliencyMethod, tokens_to_grid
from .registry import register_method


def _check_discard_ratio(discard_ratio: float) -> float:
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, int | float):
        raise TypeError(f"discard_ratio must be a float in [0, 1], got {discard_ratio!r}")
    if not 0.0 <= discard_ratio <= 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1], got {discard_ratio!r}")
    return float(discard_ratio)


def discard_lowest(
    fused: torch.Tensor, discard_ratio: float, keep_first: bool = True
) -> torch.Tensor:
    """Set the lowest ``discard_ratio`` fraction of each example's (N, N) entries to zero.

    Every example is treated on its own (never across the batch). With ``keep_first``
    the [CLS]->[CLS] entry (0, 0) is never discarded and not counted: of the other
    ``N*N - 1`` entries the ``int(discard_ratio * (N*N - 1))`` lowest are zeroed.

    Args:
        fused: Head-fused attention (B, N, N).
        discard_ratio: Fraction in [0, 1].
        keep_first: Protect entry (0, 0) (models with a [CLS] token).

    Returns:
        A new (B, N, N) tensor.
    """
    discard_ratio = _check_discard_ratio(discard_ratio)
    flat = fused.flatten(1)
    candidates = flat.shape[1] - int(keep_first)
    count = int(discard_ratio * candidates)
    if count == 0:
        return fused.clone()
    ranked = flat.clone()
    if keep_first:
        ranked[:, 0] = torch.inf
    lowest = ranked.topk(count, dim=1, largest=False).indices
    return flat.scatter(1, lowest, 0.0).reshape(fused.shape)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    keep_first: bool = True,
) -> torch.Tensor:
    """Roll attention out over blocks: ``R = Â_L ... Â_2 Â_1``.

    Per block the heads are fused, the lowest entries optionally discarded
    (:func:`discard_lowest`), the identity added for the residual connection and every row
    normalised to sum 1 (``Â = (A + I) / (A + I).sum(-1, keepdim=True)``).

    Args:
        attentions: Attention probabilities (B, heads, N, N) of consecutive blocks, first
            block first.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: Fraction of each example's lowest fused entries to zero per block.
        keep_first: Never discard the [CLS]->[CLS] entry (0, 0).

    Returns:
        The rolled-out attention (B, N, N); every row sums to 1.

    Example:
        >>> eye = torch.eye(5).expand(2, 3, 5, 5)
        >>> torch.equal(attention_rollout([eye, eye]), torch.eye(5).expand(2, 5, 5))
        True
    """
    if len(attentions) == 0:
        raise ValueError("attentions is empty: roll out at least one block")
    discard_ratio = _check_discard_ratio(discard_ratio)
    rollout = None
    for attention in attentions:
        fused = fuse_heads(attention, head_fusion)
        if discard_ratio > 0:
            fused = discard_lowest(fused, discard_ratio, keep_first)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        fused = fused + eye
        fused = fused / fused.sum(-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout
    return rollout


@dataclass(frozen=True)
class RolloutOptions(MethodOptions):
    """Options of :class:`AttentionRollout`.

    Attributes:
        head_fusion: ``"mean"`` (default), ``"max"`` or ``"min"`` over heads.
        discard_ratio: Fraction of the lowest fused attention entries zeroed per block and
            per example (the [CLS]->[CLS] entry is never discarded); 0 keeps all.
        start_layer: First block rolled out (negative counts from the end).
    """

    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    start_layer: int = 0

    def __post_init__(self) -> None:
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)
        object.__setattr__(self, "discard_ratio", _check_discard_ratio(self.discard_ratio))
        if isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int):
            raise TypeError(f"start_layer must be an int block index, got {self.start_layer!r}")


@register_method("rollout", class_specific=False, needs_attention=True)
class AttentionRollout(SaliencyMethod):
    """Attention rollout: the rows the head reads of the product of residual-corrected attention.

    Class-agnostic: ``target`` is validated and otherwise ignored. The map is the row the
    head reads ([CLS]; the mean of [CLS] and distillation rows for DeiT distilled models) of
    :func:`attention_rollout` at the image-token columns (prefix tokens dropped); pooled
    models (``global_pool="avg"``, with or without [CLS] or registers) get the mean over the
    image-token rows (the pooled output mixes all image tokens). The [CLS]->[CLS] entry is
    protected from discarding only where the head reads [CLS].

    Args:
        model: A supported timm or torchvision ViT.
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: :class:`RolloutOptions` (``head_fusion``, ``discard_ratio``,
            ``start_layer``), ``class_names`` and parts of a custom model.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                           depth=2, num_classes=5)
        >>> explainer = AttentionRollout(model, head_fusion="max", discard_ratio=0.9)
        >>> explainer.attribute(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 1, 4, 4])
    """

    Options = RolloutOptions

    def _resolve_options(self, options: RolloutOptions) -> RolloutOptions:
        start = self.anatomy.resolve_layers(options.start_layer)[0]
        check_blocks_hold_prefix("AttentionRollout", self.anatomy, self.model, start, "start_layer")
        return replace(options, start_layer=start)

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: RolloutOptions,
    ) -> torch.Tensor:
        blocks = range(options.start_layer, self.anatomy.depth)
        attentions = record_attention(self.anatomy, inputs, blocks)
        keep_first = self.anatomy.readout.cls_index == 0
        rollout = attention_rollout(
            attentions, options.head_fusion, options.discard_ratio, keep_first=keep_first
        )
        return tokens_to_grid(image_token_row(rollout, self.anatomy), grid).unsqueeze(1)
