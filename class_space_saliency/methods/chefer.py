"""Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, "GAE")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._attention import check_blocks_hold_prefix, image_token_row
from .base import MethodOptions, SaliencyMethod, tokens_to_grid
from .registry import register_method


def gradient_weighted_rollout(
    attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Chefer et al.'s relevance: ``R = I``, then ``R <- R + Ā R`` block by block.

    ``Ā = mean_h clamp(∇A ⊙ A, min=0)`` for each block's attention probabilities ``A``
    (B, heads, N, N) and the gradient ``∇A`` of the target score w.r.t. them.

    Args:
        attentions: Attention probabilities of every block, first block first.
        gradients: Gradients of the target score w.r.t. those probabilities.

    Returns:
        The relevance matrix (B, N, N).
    """
    if len(attentions) == 0 or len(attentions) != len(gradients):
        raise ValueError(
            f"need one gradient per attention tensor (at least one), got {len(attentions)} "
            f"attentions and {len(gradients)} gradients"
        )
    relevance = None
    for attention, gradient in zip(attentions, gradients, strict=True):
        weighted = (gradient.float() * attention.float()).clamp(min=0).mean(1)
        if relevance is None:
            eye = torch.eye(weighted.shape[-1], dtype=weighted.dtype, device=weighted.device)
            relevance = eye.expand_as(weighted)
        relevance = relevance + weighted @ relevance
    return relevance


@register_method("chefer", needs_gradients=True, needs_attention=True)
class CheferRollout(SaliencyMethod):
    """Gradient-weighted attention rollout, the field's strongest simple baseline.

    One forward pass records every block's attention probabilities, one backward pass
    takes the gradient of the target logit (the model's output) w.r.t. all of them (each
    gradient flows through every later block), and :func:`gradient_weighted_rollout`
    combines them. The map is the row(s) of the relevance that the head reads ([CLS], or
    the mean over the image-token rows of pooled models), at the image-token columns.

    Needs differentiable attention probabilities: timm ViTs only (torchvision's
    ``nn.MultiheadAttention`` weights are not on the gradient path; a ``TypeError`` says
    so). The model's parameters, flags and ``.grad`` are left untouched (the gradient is
    taken with ``torch.autograd.grad`` from a detached copy of the inputs).

    Args:
        model: A supported timm ViT.
        class_names: Names of the model's classes (targets by name).
        **kwargs: Parts of a custom model (the method has no options).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                           depth=2, num_classes=5)
        >>> CheferRollout(model).attribute(torch.randn(2, 3, 32, 32), target=[0, 4]).shape
        torch.Size([2, 1, 4, 4])
    """

    def _resolve_options(self, options: MethodOptions) -> MethodOptions:
        check_blocks_hold_prefix("CheferRollout", self.anatomy, self.model, 0, None)
        return options

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: MethodOptions,
    ) -> torch.Tensor:
        blocks = list(range(self.anatomy.depth))
        # A leaf input that requires grad builds the graph without touching parameter flags.
        leaf = inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            with self.anatomy.capture(attention=blocks) as cap:
                cap.output = self.anatomy.forward(leaf)
            if target is None:
                target = cap.output.argmax(-1)
            score = cap.output.gather(1, target[:, None]).sum()
            attentions = [cap.attention[b] for b in blocks]
            gradients = torch.autograd.grad(score, attentions)
        with torch.no_grad():
            relevance = gradient_weighted_rollout(attentions, gradients)
        row = image_token_row(relevance, self.anatomy)
        return tokens_to_grid(row.detach(), grid).unsqueeze(1)
