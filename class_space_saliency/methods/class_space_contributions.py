"""Direct class-space contributions of the image tokens (see :mod:`..decomposition`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .._validation import check_bool
from ..decomposition import decompose_with, decomposition_paths
from .base import MethodOptions, SaliencyMethod
from .registry import register_method


@dataclass(frozen=True)
class ClassSpaceContributionsOptions(MethodOptions):
    """Options of :class:`ClassSpaceContributions`.

    Attributes:
        layer: Block(s) whose terms are summed: int (negative counts from the end), list of
            ints or ``"all"``; block indices from 0 once the explainer has resolved them.
        heads: Head(s) whose terms are summed: int (negative counts from the end), list of
            ints or ``"all"``; head indices from 0 once resolved (``head`` names a custom
            model's classifier).
        per_layer: One map per chosen block, (B, L, h, w), in the order of ``layer``.
        per_head: One map per chosen head, (B, H, h, w), in the order of ``heads``; with
            ``per_layer`` too, (B, L * H, h, w), block-major.
    """

    layer: int | Sequence[int] | str = "all"
    heads: int | Sequence[int] | str = "all"
    per_layer: bool = False
    per_head: bool = False

    def __post_init__(self) -> None:
        check_bool("per_layer", self.per_layer)
        check_bool("per_head", self.per_head)


def resolve_heads(heads: int | Sequence[int] | str, num_heads: int) -> list[int]:
    """A head spec (int, list of ints or ``"all"``) as head indices from 0.

    Raises:
        ValueError: For an index outside ``[-num_heads, num_heads)`` or an empty list.
        TypeError: For anything that is not an int, a list of ints or ``"all"``.

    Example:
        >>> resolve_heads(-1, 12), resolve_heads("all", 3)
        ([11], [0, 1, 2])
    """
    if isinstance(heads, str):
        if heads != "all":
            raise ValueError(f"heads must be an int, a list of ints or 'all', got {heads!r}")
        return list(range(num_heads))
    specs = [heads] if isinstance(heads, int) else heads
    if isinstance(specs, torch.Tensor):
        specs = specs.tolist()
    if not isinstance(specs, Sequence) or len(specs) == 0:
        raise TypeError(f"heads must be an int, a list of ints or 'all', got {heads!r}")
    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, int):
            raise TypeError(f"head indices must be ints, got {spec!r} in {heads!r}")
        if not -num_heads <= spec < num_heads:
            raise ValueError(
                f"head {spec} is out of range for blocks with {num_heads} heads "
                f"(valid: {-num_heads} .. {num_heads - 1})"
            )
    return [spec % num_heads for spec in specs]


@register_method("class_space_contributions", needs_attention=True)
class ClassSpaceContributions(SaliencyMethod):
    """Each image token's direct contribution to the target logit, through the read state.

    The map of image token ``j`` is the sum over the chosen blocks ``l`` and heads ``h`` of
    its term in the exact decomposition of the target logit (:func:`~class_space_saliency.
    decompose`, final-norm scale frozen): the attention of the read state ([CLS], or the
    pooled tokens) on ``j`` times ``j``'s value through the head's output projection, the
    layer scale and the frozen final norm onto the target's class direction. Summed over
    every block, head and token, together with the MLP, embedding and bias terms, these
    give the logit. One forward pass, no gradients.

    Families where the split is not exact (post-norm blocks, nonlinear heads, windowed
    attention) refuse when the explainer is built, with the reason.

    Args:
        model: A supported ViT.
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: :class:`ClassSpaceContributionsOptions` (``layer``, ``heads``,
            ``per_layer``, ``per_head``), ``class_names`` and parts of a custom model; every
            option can be overridden per call in ``attribute``.

    Example:
        >>> explainer = ClassSpaceContributions(model)
        >>> explainer.attribute(images, target=labels).shape
        torch.Size([3, 1, 4, 4])
        >>> explainer.attribute(images, target=labels, layer=[0, -1], per_layer=True).shape
        torch.Size([3, 2, 4, 4])
        >>> explainer.attribute(images, target=labels, per_head=True, per_layer=True).shape
        torch.Size([3, 6, 4, 4])
    """

    Options = ClassSpaceContributionsOptions

    def _check_model(self) -> None:
        super()._check_model()
        self._num_heads = decomposition_paths(self.anatomy).num_heads

    def _resolve_options(
        self, options: ClassSpaceContributionsOptions
    ) -> ClassSpaceContributionsOptions:
        return replace(
            options,
            layer=self.anatomy.resolve_layers(options.layer),
            heads=resolve_heads(options.heads, self._num_heads),
        )

    @torch.no_grad()
    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: ClassSpaceContributionsOptions,
    ) -> torch.Tensor:
        parts = decompose_with(decomposition_paths(self.anatomy), inputs, grid, target)
        terms = parts.image_terms()[:, options.layer][:, :, options.heads]  # (B, L, H, h, w)
        if options.per_layer and options.per_head:
            return terms.flatten(1, 2)
        if options.per_layer:
            return terms.sum(2)
        if options.per_head:
            return terms.sum(1)
        return terms.sum((1, 2)).unsqueeze(1)
