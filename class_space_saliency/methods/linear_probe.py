"""The linear-probe map of the paper's perturbation comparison (official
``src/perturbation/explain_perturbation.py``, ``get_accumulated_linear_probe``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .._validation import check_choice
from ..probing import PER_TOKEN, POOLED, LinearProbes
from ..projection import normalized_rank
from .base import MethodOptions, SaliencyMethod, tokens_to_grid
from .registry import register_method

COMPONENT = "residual"
"""The probes the map reads: the residual stream's, as the official ``hs-{b}`` probes."""


@dataclass(frozen=True)
class LinearProbeOptions(MethodOptions):
    """Options of :class:`LinearProbeSaliency`.

    Attributes:
        probes: Fitted :class:`~class_space_saliency.probing.LinearProbes` with residual
            probes (``analysis.linear_probes(model, train, test).probes`` or
            ``LinearProbes.load(path)``); required.
        layer: Blocks to sum over (int, list of ints, or ``"all"``: every block the probes
            hold); block indices once resolved.
        position: ``"per_token"`` (each image token through the probe of its own position,
            as the official code) or ``"pooled"`` (every token through the pooled probe).
    """

    probes: LinearProbes | None = None
    layer: int | Sequence[int] | str = "all"
    position: str = PER_TOKEN

    def __post_init__(self) -> None:
        if self.probes is not None and not isinstance(self.probes, LinearProbes):
            raise TypeError(
                "probes must be LinearProbes (analysis.linear_probes(...).probes or "
                f"LinearProbes.load(path)), got {type(self.probes).__name__}"
            )
        check_choice("position", self.position, (PER_TOKEN, POOLED))


@register_method("linear_probe", needs_fitting=True)
class LinearProbeSaliency(SaliencyMethod):
    """Token importance from fitted linear probes of the residual stream.

    For every chosen block ``b``, image token ``i`` is scored by the target's normalised rank
    under the block's residual probe, ``1 - k_b(i) / C`` with ``k_b(i)`` the number of
    classes the probe scores strictly higher; the map is the sum over blocks. The official
    code orders tokens by ``-sum_b k_b(i)``, the same order.

    Args:
        model: The ViT the probes were fitted on.
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: :class:`LinearProbeOptions` (``probes``, ``layer``, ``position``),
            ``class_names`` and parts of a custom model.

    Raises:
        ValueError: Without probes, or with probes that do not fit the model (classes,
            blocks, no residual or pooled probes).

    Example:
        >>> from class_space_saliency import analysis, create_method
        >>> probes = analysis.linear_probes(model, (images, labels), (images, labels),
        ...                                 components="residual", curve=None).probes
        >>> create_method("linear_probe", model, probes=probes).attribute(images, labels).shape
        torch.Size([3, 1, 4, 4])
    """

    Options = LinearProbeOptions

    def _resolve_options(self, options: LinearProbeOptions) -> LinearProbeOptions:
        probes = options.probes
        if probes is None:
            raise ValueError(
                "linear_probe needs fitted probes: create_method('linear_probe', model, "
                "probes=analysis.linear_probes(model, train, test).probes) or "
                "probes=LinearProbes.load(path)"
            )
        if COMPONENT not in probes.components:
            raise ValueError(
                f"probes must include {COMPONENT!r} probes, got components {probes.components}"
            )
        if probes.num_classes != self.num_classes:
            raise ValueError(
                f"probes score {probes.num_classes} classes, the model {self.num_classes}"
            )
        if options.position == POOLED and POOLED not in probes.positions:
            raise ValueError("position='pooled' needs probes fitted with a pooled probe")
        if options.layer == "all":
            return replace(options, layer=list(probes.blocks))
        layers = self.anatomy.resolve_layers(options.layer)
        missing = sorted(set(layers) - set(probes.blocks))
        if missing:
            raise ValueError(f"no probes for blocks {missing}; probed blocks: {probes.blocks}")
        return replace(options, layer=layers)

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: LinearProbeOptions,
    ) -> torch.Tensor:
        anatomy, probes, position = self.anatomy, options.probes, options.position
        prefix = anatomy.num_prefix_tokens

        def image_logits(_: str, block: int, tokens: torch.Tensor) -> torch.Tensor:
            return probes.logits(tokens[:, prefix:], block, COMPONENT, position, start=prefix)

        blocks = list(dict.fromkeys(options.layer))
        with (
            torch.no_grad(),
            anatomy.capture([(COMPONENT, b) for b in blocks], reduce=image_logits) as cap,
        ):
            cap.output = anatomy.forward(inputs)
        if target is None:
            target = cap.output.argmax(-1)
        ranks = {b: normalized_rank(cap.tokens[(COMPONENT, b)], target) for b in blocks}
        return tokens_to_grid(sum(ranks[b] for b in options.layer), grid).unsqueeze(1)
