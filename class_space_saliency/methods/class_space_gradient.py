"""The paper's gradient-based importance map (Vilas et al. 2023, Sec. 7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import TargetType
from ..adapters import UnsupportedModelError
from ._attention import check_attention_support
from .base import SaliencyMethod, tokens_to_grid


class ClassSpaceAttentionGradient(SaliencyMethod):
    """Importance of image tokens from the class-space loss of each block's attention.

    For every chosen block ``b``, the attention branch output of [CLS] is projected through
    the final norm and head, ``loss_b = CE(proj, target)``, and the importance of image token
    ``j`` is ``-d loss_b / d a_{0j}`` for that block's post-softmax attention probabilities
    ``a`` ([CLS] query row), summed over heads and blocks. Each block's gradient is taken
    for its own loss only (a short backward from the block's head projection to its
    attention probabilities).

    Args:
        model: A supported ViT whose head reads a [CLS] token (timm, BEiT/EVA with
            ``global_pool="token"``, Hugging Face ViT-like models with eager attention).
        layer: Blocks to sum over (int, list or ``"all"``, the default as in the paper).
        paper_exact: Apply softmax before the cross-entropy (the official code's double
            softmax) instead of the plain cross-entropy of the logits.
        **anatomy_overrides: Parts of a custom model.

    Example:
        >>> maps = ClassSpaceAttentionGradient(model).attribute(images, target=labels)
    """

    cost = "forward + short backward per block (block head projection -> its attention)"

    def __init__(
        self,
        model: nn.Module,
        layer: int | Sequence[int] | str = "all",
        paper_exact: bool = False,
        **anatomy_overrides,
    ) -> None:
        super().__init__(model, **anatomy_overrides)
        self.layer = self.anatomy.resolve_layers(layer)
        self.paper_exact = bool(paper_exact)
        if self.anatomy.readout.cls_index is None:
            raise UnsupportedModelError(
                f"{type(self).__name__} needs a [CLS] token that the classifier head reads; "
                f"the head of {type(model).__name__} reads "
                f"{self.anatomy.readout.describe()} (pooled image tokens; a [CLS] or "
                "register token there never reaches the head); use ClassSpaceSaliency instead"
            )
        check_attention_support(type(self).__name__, self.anatomy, model, differentiable=True)

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        layer: int | Sequence[int] | str | None = None,
        *,
        paper_exact: bool | None = None,
        upsample: bool = False,
        max_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Gradient importance maps (B, 1, h, w).

        Args:
            inputs: Normalised images (B, C, H, W).
            target: ``None`` (predicted class), int, list of ints or 1-D int tensor.
            layer: Blocks to sum over for this call.
            paper_exact: Overrides the constructor's choice.
            upsample: Return maps upsampled to the input size.
            max_batch_size: Images per forward/backward pass.

        Returns:
            float32 maps (B, 1, h, w).
        """
        return self._attribute_batched(
            inputs,
            target,
            upsample,
            max_batch_size,
            layers=self.layer if layer is None else self.anatomy.resolve_layers(layer),
            paper_exact=self.paper_exact if paper_exact is None else bool(paper_exact),
        )

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        *,
        layers: list[int],
        paper_exact: bool,
    ) -> torch.Tensor:
        prefix = self.anatomy.num_prefix_tokens
        cls = self.anatomy.readout.cls_index
        blocks = list(dict.fromkeys(layers))
        # A leaf input that requires grad builds the graph without touching parameter flags.
        leaf = inputs.detach().requires_grad_(True)
        branches = [("attention", b) for b in blocks]
        with torch.enable_grad():
            with self.anatomy.capture(branches, attention=blocks) as cap:
                cap.output = self.anatomy.forward(leaf)
            if target is None:
                target = cap.output.argmax(-1)
            importance = 0.0
            for block in blocks:
                logits = self.anatomy.project(cap.tokens[("attention", block)][:, cls]).float()
                if paper_exact:
                    logits = logits.softmax(-1)
                loss = F.cross_entropy(logits, target, reduction="sum")
                (grad,) = torch.autograd.grad(loss, cap.attention[block], retain_graph=True)
                importance = importance - grad[:, :, cls, prefix:].sum(1).float()
        return tokens_to_grid(importance.detach(), grid).unsqueeze(1)
