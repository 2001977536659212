"""The paper's gradient-based importance map (Vilas et al. 2023, Sec. 7)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .._validation import check_bool
from ._attention import check_blocks_hold_prefix
from .base import MethodOptions, SaliencyMethod, tokens_to_grid
from .registry import register_method, register_variant


@dataclass(frozen=True)
class ClassSpaceGradientOptions(MethodOptions):
    """Options of :class:`ClassSpaceAttentionGradient`.

    Attributes:
        layer: Blocks to sum over (int, list or ``"all"``, the default as in the paper).
        paper_exact: Apply softmax before the cross-entropy (the official code's double
            softmax) instead of the plain cross-entropy of the logits.
        per_head: Return one map per block and head, (B, L, H, h, w), blocks in the order of
            ``layer`` (as the paper's block-7-head-0 figures); summed over heads and blocks
            it is the default map.
    """

    layer: int | Sequence[int] | str = "all"
    paper_exact: bool = False
    per_head: bool = False

    def __post_init__(self) -> None:
        check_bool("paper_exact", self.paper_exact)
        check_bool("per_head", self.per_head)


@register_method("class_space_gradient", needs_gradients=True, needs_attention=True, needs_cls=True)
class ClassSpaceAttentionGradient(SaliencyMethod):
    """Importance of image tokens from the class-space loss of each block's attention.

    For every chosen block ``b``, the attention branch output of [CLS] is projected through
    the final norm and head, ``loss_b = CE(proj, target)``, and the importance of image token
    ``j`` is ``-d loss_b / d a_{0j}`` for that block's post-softmax attention probabilities
    ``a`` ([CLS] query row), summed over heads and blocks (or one map per block and head
    with ``per_head=True``). Each block's gradient is taken for its own loss only (a short
    backward from the block's head projection to its attention probabilities).

    Args:
        model: A supported ViT whose head reads a [CLS] token (timm, BEiT/EVA with
            ``global_pool="token"``, Hugging Face ViT-like models with eager attention).
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: :class:`ClassSpaceGradientOptions` (``layer``, ``paper_exact``,
            ``per_head``), ``class_names`` and parts of a custom model.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                           depth=2, num_classes=5)
        >>> explainer = ClassSpaceAttentionGradient(model)
        >>> explainer.attribute(torch.randn(2, 3, 32, 32), target=[1, 3]).shape
        torch.Size([2, 1, 4, 4])
        >>> explainer.attribute(torch.randn(2, 3, 32, 32), target=[1, 3], per_head=True).shape
        torch.Size([2, 2, 3, 4, 4])
    """

    Options = ClassSpaceGradientOptions

    def _resolve_options(self, options: ClassSpaceGradientOptions) -> ClassSpaceGradientOptions:
        layers = self.anatomy.resolve_layers(options.layer)
        name = type(self).__name__
        check_blocks_hold_prefix(name, self.anatomy, self.model, min(layers), "layer")
        return replace(options, layer=layers)

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: ClassSpaceGradientOptions,
    ) -> torch.Tensor:
        prefix = self.anatomy.num_prefix_tokens
        cls = self.anatomy.readout.cls_index
        blocks = list(dict.fromkeys(options.layer))
        # A leaf input that requires grad builds the graph without touching parameter flags.
        leaf = inputs.detach().requires_grad_(True)
        branches = [("attention", b) for b in blocks]
        with torch.enable_grad():
            with self.anatomy.capture(branches, attention=blocks) as cap:
                cap.output = self.anatomy.forward(leaf)
            if target is None:
                target = cap.output.argmax(-1)
            per_block = {}  # block -> (B, H, image tokens)
            for block in blocks:
                logits = self.anatomy.project(cap.tokens[("attention", block)][:, cls]).float()
                if options.paper_exact:
                    logits = logits.softmax(-1)
                loss = F.cross_entropy(logits, target, reduction="sum")
                (grad,) = torch.autograd.grad(loss, cap.attention[block], retain_graph=True)
                per_block[block] = -grad[:, :, cls, prefix:].detach().float()
        if options.per_head:
            maps = torch.stack([per_block[b] for b in options.layer], 1)  # (B, L, H, N)
            return tokens_to_grid(maps.flatten(0, 2), grid).reshape(*maps.shape[:3], *grid)
        importance = sum(importance.sum(1) for importance in per_block.values())
        return tokens_to_grid(importance, grid).unsqueeze(1)


# The map the paper's perturbation figures rank tokens by (official explain_perturbation.py,
# source "grads"), with the official code's double softmax.
register_variant("class_space_gradient_paper", "class_space_gradient", paper_exact=True)
