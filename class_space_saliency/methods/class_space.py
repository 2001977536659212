"""Class-space saliency (Vilas et al., NeurIPS 2023): project tokens onto the class space."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .._validation import check_bool, check_choice
from ..anatomy import COMPONENTS
from ..projection import TOKEN_SCORES, token_scores
from .base import MethodOptions, SaliencyMethod, tokens_to_grid
from .registry import register_method

COMBINES = ("mean", "sum")


@dataclass(frozen=True)
class ClassSpaceOptions(MethodOptions):
    """Options of :class:`ClassSpaceSaliency`.

    Attributes:
        layer: Block(s): int (negative counts from the end), list of ints or ``"all"``;
            block indices from 0 once the explainer has resolved them.
        component: ``"residual"`` (block output), ``"attention"`` or ``"mlp"`` (branch
            outputs before the residual add, after layer scale).
        score: ``"logit"``, ``"probability"`` or ``"rank"`` (``1 - rank/C``, 1 = top-1).
        combine: How maps of several blocks combine into one: ``"mean"`` or ``"sum"``.
        differentiable: Keep the autograd graph (``rank`` scores have zero gradient).
        per_layer: Return one map per block, (B, L, h, w), in the order of ``layer``.
    """

    layer: int | Sequence[int] | str = -1
    component: str = "residual"
    score: str = "logit"
    combine: str = "mean"
    differentiable: bool = False
    per_layer: bool = False

    def __post_init__(self) -> None:
        check_choice("component", self.component, COMPONENTS)
        check_choice("score", self.score, TOKEN_SCORES)
        check_choice("combine", self.combine, COMBINES)
        check_bool("differentiable", self.differentiable)
        check_bool("per_layer", self.per_layer)


@register_method("class_space")
class ClassSpaceSaliency(SaliencyMethod):
    """Saliency from the class-space projection of image tokens, in one forward pass.

    The map of block ``b`` is the target class's score of ``head(norm(x_i^b))`` for each
    image token ``x_i^b``, on the patch grid. No gradients and, by default, no autograd
    graph; with ``differentiable=True`` the maps keep the graph (to the inputs and the
    model's parameters), so that they can enter a training loss.

    Args:
        model: A supported ViT.
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: :class:`ClassSpaceOptions` (``layer``, ``component``, ``score``,
            ``combine``, ``differentiable``, ``per_layer``), ``class_names`` and parts of a
            custom model (see ``ViTAnatomy.from_model``); every option can be overridden
            per call in ``attribute``.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                           depth=2, num_classes=5)
        >>> images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
        >>> explainer = ClassSpaceSaliency(model, score="probability")
        >>> explainer.attribute(images, target=labels).shape
        torch.Size([3, 1, 4, 4])
        >>> explainer.attribute(images, target=labels, layer="all", per_layer=True).shape
        torch.Size([3, 2, 4, 4])
    """

    Options = ClassSpaceOptions

    def _resolve_options(self, options: ClassSpaceOptions) -> ClassSpaceOptions:
        return replace(options, layer=self.anatomy.resolve_layers(options.layer))

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: ClassSpaceOptions,
    ) -> torch.Tensor:
        anatomy, component, score = self.anatomy, options.component, options.score

        def image_scores(_: str, block: int, tokens: torch.Tensor) -> torch.Tensor:
            return token_scores(anatomy, anatomy.image_tokens(tokens, block, grid), target, score)

        def image_tokens(_: str, block: int, tokens: torch.Tensor) -> torch.Tensor:
            return anatomy.image_tokens(tokens, block, grid)

        # With a known target the scores are reduced inside the hook, so only (B, N) per
        # block is kept; for the predicted class the image tokens wait for the output.
        reduce = image_tokens if target is None else image_scores
        layers = options.layer
        unique = layers if len(layers) == 1 else list(dict.fromkeys(layers))
        with torch.set_grad_enabled(options.differentiable and torch.is_grad_enabled()):
            with anatomy.capture([(component, b) for b in unique], reduce=reduce) as cap:
                cap.output = anatomy.forward(inputs)
            if target is None:
                target = cap.output.argmax(-1)
                for key, tokens in cap.tokens.items():
                    cap.tokens[key] = token_scores(anatomy, tokens, target, score)
            maps = [tokens_to_grid(cap.tokens[(component, b)], grid) for b in layers]
        if len(maps) == 1:
            return maps[0].unsqueeze(1)
        maps = torch.stack(maps, 1)
        if options.per_layer:
            return maps
        return (
            maps.mean(1, keepdim=True) if options.combine == "mean" else maps.sum(1, keepdim=True)
        )
