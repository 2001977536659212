"""What every model-family adapter answers, and the shared pieces they are built from.

An adapter is a small module with ``NAME``, ``LOOKS_FOR`` (what it searches a model for, quoted
in :class:`UnsupportedModelError`), ``matches(model) -> bool`` and ``parts(model) -> dict``: the
keyword arguments of :class:`~class_space_saliency.anatomy.ViTAnatomy` for that model.
Hooks are never registered here: :meth:`ViTAnatomy.capture` does that, from these parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """A model (or a method on it) that no adapter supports; the message says what was sought."""


@dataclass(frozen=True)
class Readout:
    """Which token rows the classifier head reads.

    Attributes:
        cls_rows: Prefix tokens read by a head: ``(0,)`` for [CLS], ``(0, 1)`` for DeiT's
            [CLS] and distillation tokens (two heads, averaged). Empty for pooled heads.
        pool_start: For heads on the mean of tokens, the first token averaged (the number of
            prefix tokens, so registers and [CLS] are never pooled); ``None`` if no pooling.

    Example:
        >>> Readout(pool_start=5).select(torch.ones(2, 9, 9)).shape
        torch.Size([2, 9])
    """

    cls_rows: tuple[int, ...] = ()
    pool_start: int | None = None

    def __post_init__(self) -> None:
        if not self.cls_rows and self.pool_start is None:
            raise ValueError("a Readout needs cls_rows, pool_start or both")

    @property
    def cls_index(self) -> int | None:
        """The [CLS] token a head reads, or ``None`` where the head only pools."""
        return self.cls_rows[0] if self.cls_rows else None

    def select(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of the rows the head reads: (B, N, ...) -> (B, ...).

        Each read prefix row and the pooled mean (if any) count as one part; the parts are
        averaged, as the heads' logits are (DeiT distilled: two heads; DINOv2: [CLS] and mean).
        """
        parts = [values[:, row] for row in self.cls_rows]
        if self.pool_start is not None:
            parts.append(values[:, self.pool_start :].mean(1))
        return parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)

    def describe(self) -> str:
        """Human-readable, e.g. ``"token 0"`` or ``"mean of tokens 5.."``."""
        parts = [f"token {row}" for row in self.cls_rows]
        if self.pool_start is not None:
            parts.append(f"mean of tokens {self.pool_start}..")
        return " + ".join(parts)


@dataclass(frozen=True)
class TokenPath:
    """How a model's token sequence is built and classified, for token-removal curves.

    Attributes:
        embed: ``images (B, C, H, W) -> tokens (B, prefix + N, D)`` after position embeddings.
        classify: ``tokens (B, prefix + n, D) -> logits (B, C)`` for any ``n``.
        num_prefix_tokens: Tokens before the image tokens.
    """

    embed: Callable[[torch.Tensor], torch.Tensor]
    classify: Callable[[torch.Tensor], torch.Tensor]
    num_prefix_tokens: int


class NormThenHeads(nn.Module):
    """``mean_k head_k(norm(x))``: the class-space projection of any token state."""

    def __init__(self, norm: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.norm = norm
        self.heads = nn.ModuleList(heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        normed = self.norm(tokens)
        logits = self.heads[0](normed)
        for head in self.heads[1:]:
            logits = logits + head(normed)
        return logits / len(self.heads) if len(self.heads) > 1 else logits


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 8) -> (7, 8)``."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def first_conv_in_channels(module: nn.Module) -> int | None:
    """Input channels of the first ``nn.Conv2d`` in ``module`` (a patch embedding, a conv stem
    or a hybrid's CNN backbone), or ``None`` if it has none."""
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def token_stride(patch_embed: nn.Module) -> tuple[int, int]:
    """Pixels per token of a timm patch embedding: its patch size, times the CNN backbone's
    reduction (``feature_ratio``) for hybrid embeddings (``HybridEmbed``: ResNet-ViT hybrids,
    ViTamin), whose own ``patch_size`` counts feature-map cells."""
    stride = pair(patch_embed.patch_size)
    ratio = getattr(patch_embed, "feature_ratio", None)
    if ratio is None:
        return stride
    ratio = pair(ratio)
    return (stride[0] * ratio[0], stride[1] * ratio[1])


def is_post_norm(block: nn.Module) -> bool:
    """Whether ``block`` normalises each branch after it: ``x + norm1(attn(x))``, then
    ``x + norm2(mlp(x))`` (timm ``ResPostBlock``, ``ResPostRelPosBlock``,
    ``EvaBlockPostNorm``; the paper's GAP model ``vit_base_patch16_rpn_224`` has them)."""
    from timm.models.eva import EvaBlockPostNorm
    from timm.models.vision_transformer import ResPostBlock
    from timm.models.vision_transformer_relpos import ResPostRelPosBlock

    return isinstance(block, ResPostBlock | ResPostRelPosBlock | EvaBlockPostNorm)


def timm_block_parts(
    blocks: Sequence[nn.Module],
    stem: nn.Module | None,
    scale_parameters: tuple[str, str] = ("gamma_1", "gamma_2"),
) -> dict:
    """Branches, layer scales, norms and attention inputs of timm-style blocks.

    Pre-norm blocks (``x + ls1(attn(norm1(x)))``): see :func:`block_branches`; the
    attention reads ``norm1``'s output. Post-norm blocks (:func:`is_post_norm`): the
    branches added to the stream are the outputs of ``norm1`` and ``norm2`` (no layer
    scale), there is no norm before attention, and the attention reads the incoming stream:
    the previous block's output (``stem``'s for the first block).

    Args:
        blocks: The transformer blocks.
        stem: The module whose output enters the first block (timm ``norm_pre``), or None.
        scale_parameters: Names of the attention / MLP layer-scale parameters.

    Returns:
        ``attention_branches``, ``mlp_branches``, ``layer_scales``, ``pre_attention_norms``
        and ``attention_inputs`` for ViTAnatomy.
    """
    parts = block_branches(blocks, "attn", "mlp", scale_parameters=scale_parameters)
    norms: list[nn.Module | None] = []
    inputs: list[nn.Module | None] = []
    for i, block in enumerate(blocks):
        # ParallelScalingBlock: in_norm feeds the fused attention + MLP projection
        norm1 = getattr(block, "norm1", getattr(block, "in_norm", None))
        if not is_post_norm(block):
            norms.append(norm1)
            inputs.append(norm1)
            continue
        parts["attention_branches"][i], parts["mlp_branches"][i] = block.norm1, block.norm2
        parts["layer_scales"]["attention"][i] = parts["layer_scales"]["mlp"][i] = None
        norms.append(None)
        inputs.append(blocks[i - 1] if i else stem)
    return dict(parts, pre_attention_norms=norms, attention_inputs=inputs)


def block_branches(
    blocks: Sequence[nn.Module],
    attn: str,
    mlp: str,
    scale_modules: tuple[str, str] = ("ls1", "ls2"),
    scale_parameters: tuple[str, str] = ("gamma_1", "gamma_2"),
) -> dict:
    """Branch modules and layer scales of pre-norm blocks.

    The attention (MLP) branch is the block's layer-scale module (timm ``ls1``/``ls2``,
    DINOv2 ``layer_scale1``/``layer_scale2``) where it has one, else the attention (MLP)
    module times the block's layer-scale parameter (timm BEiT/EVA ``gamma_1``/``gamma_2``,
    Hugging Face BEiT ``lambda_1``/``lambda_2``) where that is not ``None``.

    Args:
        blocks: The transformer blocks.
        attn: Name of the attention module in a block.
        mlp: Name of the MLP module in a block.
        scale_modules: Names of the attention / MLP layer-scale modules.
        scale_parameters: Names of the attention / MLP layer-scale parameters.

    Returns:
        ``attention_branches``, ``mlp_branches`` and ``layer_scales`` for ViTAnatomy.
    """
    out: dict = dict(attention_branches=[], mlp_branches=[])
    scales: dict[str, list[torch.Tensor | None]] = dict(attention=[], mlp=[])
    for block in blocks:
        for component, core, scale_module, scale_parameter in (
            ("attention", attn, scale_modules[0], scale_parameters[0]),
            ("mlp", mlp, scale_modules[1], scale_parameters[1]),
        ):
            module = getattr(block, scale_module, None) if scale_module else None
            scale = None
            if not isinstance(module, nn.Module):
                module = getattr(block, core, None)
                scale = getattr(block, scale_parameter, None)
            out[f"{component}_branches"].append(module)
            scales[component].append(scale)
    out["layer_scales"] = scales
    return out
