"""Class-space saliency (Vilas et al., NeurIPS 2023): project tokens onto the class space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._validation import TargetType, check_choice
from ..anatomy import COMPONENTS
from ..projection import SCORES, token_scores
from .base import SaliencyMethod, tokens_to_grid

COMBINES = ("mean", "sum")


class ClassSpaceSaliency(SaliencyMethod):
    """Saliency from the class-space projection of image tokens, in one forward pass.

    The map of block ``b`` is the target class's score of ``head(norm(x_i^b))`` for each
    image token ``x_i^b``, on the patch grid. No gradients and, by default, no autograd
    graph; with ``differentiable=True`` the maps keep the graph (to the inputs and the
    model's parameters), so that they can enter a training loss.

    Args:
        model: A supported ViT.
        layer: Default block(s): int (negative counts from the end), list of ints or ``"all"``.
        component: ``"residual"`` (block output), ``"attention"`` or ``"mlp"`` (branch output
            before the residual add, after layer scale).
        score: ``"logit"``, ``"probability"`` or ``"rank"`` (``1 - rank/C``, 1 = top-1).
        combine: How maps of several blocks combine into one: ``"mean"`` or ``"sum"``.
        differentiable: Keep the autograd graph (``rank`` scores have zero gradient).
        **anatomy_overrides: Parts of a custom model (see ``ViTAnatomy.from_model``).

    Example:
        >>> explainer = ClassSpaceSaliency(model)
        >>> maps = explainer.attribute(images, target=labels)  # (B, 1, h, w)
        >>> every_block = explainer.attribute(images, target=labels, layer="all", per_layer=True)
    """

    cost = "forward only (no gradients), any number of blocks"

    def __init__(
        self,
        model: nn.Module,
        layer: int | Sequence[int] | str = -1,
        component: str = "residual",
        score: str = "logit",
        combine: str = "mean",
        differentiable: bool = False,
        **anatomy_overrides,
    ) -> None:
        super().__init__(model, **anatomy_overrides)
        self.layer = self.anatomy.resolve_layers(layer)
        self.component = check_choice("component", component, COMPONENTS)
        self.score = check_choice("score", score, SCORES)
        self.combine = check_choice("combine", combine, COMBINES)
        if not isinstance(differentiable, bool):
            raise TypeError(f"differentiable must be a bool, got {differentiable!r}")
        self.differentiable = differentiable

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        layer: int | Sequence[int] | str | None = None,
        *,
        component: str | None = None,
        score: str | None = None,
        per_layer: bool = False,
        combine: str | None = None,
        upsample: bool = False,
        max_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Class-space saliency maps.

        Args:
            inputs: Normalised images (B, C, H, W).
            target: ``None`` (predicted class), int, list of ints or 1-D int tensor.
            layer: Block(s) for this call; defaults to the constructor's.
            component: Overrides the constructor's component.
            score: Overrides the constructor's score.
            per_layer: Return one map per block, (B, L, h, w), in the order of ``layer``.
            combine: Overrides how several blocks combine when ``per_layer`` is False.
            upsample: Return maps bilinearly upsampled to the input size (H, W).
            max_batch_size: Images per forward pass.

        Returns:
            float32 maps (B, 1, h, w), or (B, L, h, w) with ``per_layer=True``.
        """
        return self._attribute_batched(
            inputs,
            target,
            upsample,
            max_batch_size,
            layers=self.layer if layer is None else self.anatomy.resolve_layers(layer),
            component=check_choice("component", component or self.component, COMPONENTS),
            score=check_choice("score", score or self.score, SCORES),
            per_layer=per_layer,
            combine=check_choice("combine", combine or self.combine, COMBINES),
        )

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        *,
        layers: list[int],
        component: str,
        score: str,
        per_layer: bool,
        combine: str,
    ) -> torch.Tensor:
        prefix = self.anatomy.num_prefix_tokens

        def image_scores(_: str, __: int, tokens: torch.Tensor) -> torch.Tensor:
            return token_scores(self.anatomy, tokens[:, prefix:], target, score)

        def image_tokens(_: str, __: int, tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, prefix:]

        # With a known target the scores are reduced inside the hook, so only (B, N) per
        # block is kept; for the predicted class the image tokens wait for the output.
        reduce = image_tokens if target is None else image_scores
        unique = list(dict.fromkeys(layers))
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            with self.anatomy.capture([(component, b) for b in unique], reduce=reduce) as cap:
                cap.output = self.anatomy.forward(inputs)
            if target is None:
                target = cap.output.argmax(-1)
                for key, tokens in cap.tokens.items():
                    cap.tokens[key] = token_scores(self.anatomy, tokens, target, score)
            maps = [tokens_to_grid(cap.tokens[(component, b)], grid) for b in layers]
        maps = torch.stack(maps, 1)
        if per_layer:
            return maps
        return maps.mean(1, keepdim=True) if combine == "mean" else maps.sum(1, keepdim=True)
