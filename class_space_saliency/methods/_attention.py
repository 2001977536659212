"""Shared parts of the attention baselines: head fusion, the query row, attention checks.

Used by :mod:`.raw_attention`, :mod:`.rollout` and :mod:`.chefer`, so that every attention
map reads its row the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_choice
from ..adapters import UnsupportedModelError
from ..anatomy import ViTAnatomy

HEAD_FUSIONS = ("mean", "max", "min")
"""How attention heads (B, heads, N, N) fuse into one (B, N, N) matrix."""


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse the heads of attention probabilities (B, heads, N, N) into (B, N, N).

    Args:
        attention: Post-softmax attention probabilities (B, heads, N, N).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Returns:
        The fused matrix (B, N, N), in float32 (or float64 for float64 inputs).
    """
    head_fusion = check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    if attention.dim() != 4:
        raise ValueError(
            f"attention must have shape (B, heads, N, N), got {tuple(attention.shape)}"
        )
    if attention.dtype != torch.float64:
        attention = attention.float()
    if head_fusion == "mean":
        return attention.mean(1)
    if head_fusion == "max":
        return attention.amax(1)
    return attention.amin(1)


def image_token_row(matrix: torch.Tensor, anatomy: ViTAnatomy) -> torch.Tensor:
    """The query rows the head reads, of token-to-token scores (B, N, N), at image columns.

    A model whose head reads [CLS] gets row 0; DeiT distilled models the mean of rows 0 and
    1 (their two heads are averaged); pooled models (``global_pool="avg"``, with or without
    [CLS], with registers) the mean over the pooled image-token rows, never a register's.
    Prefix columns ([CLS], distillation, registers) are dropped.

    Args:
        matrix: (B, N, N), rows = queries, columns = keys.
        anatomy: The model's anatomy (its :class:`~class_space_saliency.adapters.Readout`).

    Returns:
        (B, N - num_prefix_tokens) scores of the image tokens.
    """
    return anatomy.read_rows(matrix)


def check_attention_support(
    method: str, anatomy: ViTAnatomy, model: nn.Module, differentiable: bool = False
) -> None:
    """Raise ``UnsupportedModelError`` where ``method`` cannot read (differentiable) attention.

    Args:
        method: The method's name, for the message.
        anatomy: The model's anatomy.
        model: The model, for the message.
        differentiable: Whether the method takes gradients w.r.t. the attention
            probabilities; torchvision's ``nn.MultiheadAttention`` returns averaged-off
            copies of its weights that are not on the gradient path of the output.
    """
    if anatomy.attention_modules is None:
        reason = anatomy.attention_reason or (
            "no supported attention modules were found (timm Attention with attn_drop, "
            "torchvision nn.MultiheadAttention or Hugging Face eager attention)"
        )
        raise UnsupportedModelError(
            f"{method} needs the attention probabilities of every block of "
            f"{type(model).__name__}: {reason}"
        )
    if differentiable and anatomy.attention_kind == "mha":
        raise UnsupportedModelError(
            f"{method} needs differentiable attention probabilities, which timm-style and "
            "Hugging Face eager attention expose "
            f"({type(model).__name__} uses nn.MultiheadAttention, "
            "whose returned weights are not on the gradient path); use AttentionRollout "
            "or GradCAM for this model"
        )


def check_blocks_hold_prefix(
    method: str, anatomy: ViTAnatomy, model: nn.Module, first_block: int, option: str | None
) -> None:
    """Raise ``UnsupportedModelError`` unless every block from ``first_block`` on holds the
    prefix tokens (the [CLS] row the head reads; attention matrices of one size).

    Args:
        method: The method's name, for the message.
        anatomy: The model's anatomy (``prefix_from_block``).
        model: The model, for the message.
        first_block: The first block the method reads.
        option: The option that chooses the blocks, for the message (e.g. ``"start_layer"``;
            ``None`` for a method that reads every block).
    """
    joins = anatomy.prefix_from_block
    if first_block >= joins:
        return
    name = type(model).__name__
    if joins >= anatomy.depth:
        raise UnsupportedModelError(
            f"{method} needs the rows the head reads in every block it reads, but the [CLS] "
            f"token of {name} joins only after its last block (in class-attention blocks)"
        )
    advice = f"choose blocks from {joins} on (e.g. {option}={joins})" if option else "it reads all"
    raise UnsupportedModelError(
        f"{method} reads blocks from {first_block} on, but the [CLS] token of {name} joins "
        f"the tokens at block {joins} (the attention matrices change size there); {advice}"
    )


@torch.no_grad()
def record_attention(
    anatomy: ViTAnatomy, inputs: torch.Tensor, blocks: Sequence[int]
) -> list[torch.Tensor]:
    """Attention probabilities (B, heads, N, N) of ``blocks`` from one forward pass, in order."""
    blocks = list(blocks)
    with anatomy.capture(attention=blocks) as cap:
        cap.output = anatomy.forward(inputs)
    return [cap.attention[b] for b in blocks]
