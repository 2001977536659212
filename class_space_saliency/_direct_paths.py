"""How the blocks of a pre-norm ViT write into the residual stream, as tensors.

A pre-norm block adds ``ls1 * attn(norm1(x))`` and then ``ls2 * mlp(norm2(x))`` to its
residual stream ``x``, so the final state of a token is the embedding plus every block's
attention and MLP outputs. The attention output at query token ``i`` splits over heads and
source tokens::

    attn_i = sum_h sum_j A[h, i, j] * W_O^h (W_V^h a_j + b_V^h) + b_O,   a = norm1(x)

:class:`AttentionPath` holds one block's value and output projections and layer scale (timm
``Attention`` / BEiT / EVA, ``nn.MultiheadAttention`` of torchvision and open_clip, Hugging Face
``q_proj``/``k_proj``/``v_proj``/``o_proj`` attention); :func:`check_blocks` refuses blocks
that are not known to be pre-norm residual blocks, naming the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import UnsupportedModelError
from .anatomy import ViTAnatomy

PRE_NORM_BLOCKS = frozenset(
    {
        "timm.models.vision_transformer.Block",
        "timm.models.beit.Block",
        "timm.models.eva.EvaBlock",
        "torchvision.models.vision_transformer.EncoderBlock",
        "open_clip.transformer.ResidualAttentionBlock",
        "transformers.models.vit.modeling_vit.ViTLayer",
        "transformers.models.deit.modeling_deit.DeiTLayer",
        "transformers.models.beit.modeling_beit.BeitLayer",
        "transformers.models.dinov2.modeling_dinov2.Dinov2Layer",
        "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers."
        "Dinov2WithRegistersLayer",
    }
)
"""Blocks known to compute ``x + ls1 * attn(norm1(x))``, then ``+ ls2 * mlp(norm2(x))``."""

NOT_DECOMPOSABLE = {
    "ResPostBlock": "post-norm blocks (x + norm1(attn(x))) normalise each branch on the "
    "residual path, so its output is not a sum over heads and tokens",
    "EvaBlockPostNorm": "post-norm blocks (x + norm1(attn(x))) normalise each branch on the "
    "residual path, so its output is not a sum over heads and tokens",
    "ParallelScalingBlock": "parallel blocks read attention and MLP from one fused projection",
    "ParallelThingsBlock": "parallel blocks sum several attention branches per block",
    "CustomResidualAttentionBlock": "its attention normalises the head outputs (ln_attn / "
    "scale_heads) before the output projection",
    "SwinTransformerBlock": "Swin attends within shifted windows and merges patches between "
    "stages, so no head reads every token",
}
"""Block classes that the decomposition refuses, and why."""


def _qualified_name(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def check_blocks(anatomy: ViTAnatomy) -> None:
    """Raise ``UnsupportedModelError`` unless every block is a known pre-norm residual block."""
    for block in anatomy.blocks:
        name = type(block).__name__
        if name in NOT_DECOMPOSABLE:
            raise UnsupportedModelError(
                f"the direct decomposition is not exact for {type(anatomy.model).__name__}: "
                f"{NOT_DECOMPOSABLE[name]}"
            )
        if _qualified_name(block) not in PRE_NORM_BLOCKS:
            raise UnsupportedModelError(
                f"the direct decomposition is exact for pre-norm residual blocks "
                f"(x + attn(norm1(x)), then + mlp(norm2(x))); {_qualified_name(block)} of "
                f"{type(anatomy.model).__name__} is not one it knows"
            )


@dataclass(frozen=True)
class AttentionPath:
    """What one block's attention writes into the residual stream, as tensors.

    Attributes:
        value_weight: (H * d, D) value projection (heads in order, ``d`` per head).
        value_bias: (H * d,) or ``None``.
        out_weight: (D, H * d) output projection ``W_O``.
        out_bias: (D,) or ``None`` (``b_O``).
        num_heads: H.
        scale: (D,) layer scale applied to the attention output, or ``None``.
    """

    value_weight: torch.Tensor
    value_bias: torch.Tensor | None
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    num_heads: int
    scale: torch.Tensor | None

    def values(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-head values (B, H, N, d) of the attention module's input (B, N, D)."""
        bias = None if self.value_bias is None else self.value_bias.to(inputs.dtype)
        values = F.linear(inputs, self.value_weight.to(inputs.dtype), bias)
        return values.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def out_per_head(self, dtype: torch.dtype) -> torch.Tensor:
        """``W_O`` per head, times the layer scale: (H, D, d)."""
        weight = self.out_weight.to(dtype)
        if self.scale is not None:
            weight = self.scale.to(dtype).reshape(-1, 1) * weight
        return weight.unflatten(1, (self.num_heads, -1)).transpose(0, 1)

    def constant(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``ls * b_O``, added to every token whatever it attends to; ``None`` without bias."""
        if self.out_bias is None:
            return None
        bias = self.out_bias.to(dtype)
        return bias if self.scale is None else self.scale.to(dtype).reshape(-1) * bias


def _linear_or_none(module: nn.Module, name: str) -> nn.Linear | None:
    found = getattr(module, name, None)
    return found if isinstance(found, nn.Linear) else None


def _projections(attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, nn.Linear, int]:
    """``(value weight, value bias, output projection, heads)`` of an attention module."""
    owner = type(attention).__name__
    if isinstance(attention, nn.MultiheadAttention):
        if not attention._qkv_same_embed_dim or attention.bias_k is not None:
            raise UnsupportedModelError(
                f"{owner} with separate key/value widths or extra key/value biases is not supported"
            )
        if attention.add_zero_attn or not attention.batch_first:
            raise UnsupportedModelError(
                f"{owner} with add_zero_attn or batch_first=False is not supported"
            )
        width = attention.embed_dim
        bias = attention.in_proj_bias
        return (
            attention.in_proj_weight[2 * width :],
            None if bias is None else bias[2 * width :],
            attention.out_proj,
            attention.num_heads,
        )
    for name in ("norm", "gate"):  # timm: a norm or a gate between the heads and proj
        inner = getattr(attention, name, None)
        if inner is not None and not isinstance(inner, nn.Identity):
            raise UnsupportedModelError(
                f"{owner} applies {name} {type(inner).__name__} to the head outputs before "
                "the output projection, so its output is not a sum over heads and tokens"
            )
    out = _linear_or_none(attention, "proj") or _linear_or_none(attention, "o_proj")
    heads = getattr(attention, "num_heads", None) or getattr(attention, "num_attention_heads", 0)
    qkv, v_proj = _linear_or_none(attention, "qkv"), _linear_or_none(attention, "v_proj")
    if out is None or not heads or (qkv is None and v_proj is None):
        raise UnsupportedModelError(
            f"cannot read the value and output projections of {owner}: looked for "
            "nn.MultiheadAttention, timm's qkv/v_proj + proj + num_heads and Hugging Face's "
            "v_proj + o_proj + num_attention_heads"
        )
    if v_proj is not None:
        return v_proj.weight, v_proj.bias, out, int(heads)
    width = qkv.weight.shape[0] // 3
    bias = getattr(attention, "v_bias", None)  # BEiT / EVA: separate q and v biases
    if bias is None and qkv.bias is not None:
        bias = qkv.bias[2 * width :]
    return qkv.weight[2 * width :], bias, out, int(heads)


def _layer_scale(anatomy: ViTAnatomy, block: int, width: int) -> torch.Tensor | None:
    """The layer scale of ``block``'s attention output (D,), or ``None``.

    A layer-scale parameter (BEiT/EVA ``gamma_1``, Hugging Face BEiT ``lambda_1``) is read
    as it is; a layer-scale module (timm ``ls1``, DINOv2 ``layer_scale1``, open_clip
    ``ls_1``) multiplies elementwise, so its vector is its output for a vector of ones.
    """
    scales = (anatomy.layer_scales or {}).get("attention")
    if scales is not None and scales[block] is not None:
        return scales[block].detach().reshape(-1)
    branch = anatomy.attention_branches[block]
    if branch is anatomy.attention_modules[block]:
        return None
    like = next(anatomy.attention_modules[block].parameters())
    with torch.no_grad():
        return branch(torch.ones(width, dtype=like.dtype, device=like.device)).reshape(-1)


def attention_paths(anatomy: ViTAnatomy) -> list[AttentionPath]:
    """The :class:`AttentionPath` of every block.

    Raises:
        UnsupportedModelError: For blocks that are not known pre-norm residual blocks,
            attention modules whose projections cannot be read, or heads that differ in
            number between blocks.
    """
    check_blocks(anatomy)
    if anatomy.attention_modules is None or anatomy.attention_branches is None:
        raise UnsupportedModelError(
            f"the attention modules of {type(anatomy.model).__name__} cannot be read: "
            f"{anatomy.attention_reason or 'none were found'}"
        )
    if anatomy.mlp_branches is None or any(m is None for m in anatomy.mlp_branches):
        raise UnsupportedModelError(
            f"the MLP outputs of {type(anatomy.model).__name__} cannot be read"
        )
    paths = []
    for block, attention in enumerate(anatomy.attention_modules):
        value_weight, value_bias, out, heads = _projections(attention)
        paths.append(
            AttentionPath(
                value_weight.detach(),
                None if value_bias is None else value_bias.detach(),
                out.weight.detach(),
                None if out.bias is None else out.bias.detach(),
                heads,
                _layer_scale(anatomy, block, out.weight.shape[0]),
            )
        )
    if len({path.num_heads for path in paths}) > 1:
        raise UnsupportedModelError(
            f"the blocks of {type(anatomy.model).__name__} have different numbers of heads "
            f"({sorted({path.num_heads for path in paths})})"
        )
    return paths
