"""Token states inside and around every block, read in class space in one forward pass.

A pre-norm block computes ``x -> m = x + attention(x) -> y = m + mlp(m)``. The analyses of
:mod:`.sublayers` and :mod:`.context` compare the class-space projections of these states
(the "logit lens": ``head(norm(h))``, as for identifiability), token by token:

- ``"block_input"``: ``x``, the stream entering the block (the attention's input; for block 0
  the embedded tokens);
- ``"attention"``: the attention branch ``attention(x)`` (after layer scale);
- ``"mlp_input"``: ``m = x + attention(x)``, the stream between the sublayers (the MLP's
  input), rebuilt from the two captures above;
- ``"mlp"``: the MLP branch ``mlp(m)`` (after layer scale);
- ``"block_output"``: ``y``, the stream leaving the block.

Only per-token scores are kept (the label's logit, the top-1 class, the label's rank position),
never the states themselves, so memory stays at a few numbers per token.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import UnsupportedModelError
from ..anatomy import ViTAnatomy
from ..projection import target_class_column

STATES = ("block_input", "attention", "mlp_input", "mlp", "block_output")
"""The token states of a block that :func:`token_scores` reads (see the module docstring)."""

_COMPONENT_OF_STATE = {"attention": "attention", "mlp": "mlp", "block_output": "residual"}


@dataclass
class TokenScores:
    """What one token state says in class space, per token.

    Attributes:
        label_logit: (B, N) float32 logit of the image's label.
        top1: (B, N) int64 class with the largest logit.
        position: (B, N) int64 number of classes with a strictly larger logit than the label's
            (0: the label is top-1; identifiability is ``1 - position / C``).
    """

    label_logit: torch.Tensor
    top1: torch.Tensor
    position: torch.Tensor

    @classmethod
    def of(cls, anatomy: ViTAnatomy, tokens: torch.Tensor, labels: torch.Tensor) -> TokenScores:
        """Project token states (B, N, D) and score them against ``labels`` (B,)."""
        logits = anatomy.project(tokens).float()
        label_logit = target_class_column(logits, labels)
        position = (logits > label_logit.unsqueeze(-1)).sum(-1)
        return cls(label_logit, logits.argmax(-1), position)


class _Reader:
    """The ``reduce`` of :meth:`ViTAnatomy.capture`: scores each wanted state as it passes.

    Hooks fire in forward order (a block's input, attention branch, MLP branch, output), so
    the stream between the sublayers is the block input plus the attention branch; that the
    block's output is that plus the MLP branch is checked, so a block of another form (a
    post-norm block, say) raises instead of giving a wrong MLP input.
    """

    def __init__(
        self,
        anatomy: ViTAnatomy,
        labels: torch.Tensor,
        states: Collection[str],
        images: torch.Tensor | None,
    ) -> None:
        if anatomy.prefix_from_block:
            raise UnsupportedModelError(
                f"{type(anatomy.model).__name__} adds its prefix tokens after block "
                f"{anatomy.prefix_from_block - 1}: its token positions change along the blocks"
            )
        self.anatomy, self.labels, self.states, self.images = anatomy, labels, states, images
        self.grid = None if images is None else anatomy.grid_size(images.shape)
        self.rebuild = "mlp_input" in states
        self.stream: dict[int, torch.Tensor] = {}
        self.scores: dict[tuple[str, int], TokenScores] = {}

    def sites(self, layers: Sequence[int]) -> dict[str, list[tuple[str, int]]]:
        """The ``components`` and ``inputs`` of :meth:`ViTAnatomy.capture` this reader needs."""
        states = set(self.states) - {"mlp_input"}
        if self.rebuild:
            states |= {"block_input", "attention", "mlp", "block_output"}
        ordered = [s for s in STATES if s in states]
        return {
            "components": [
                (_COMPONENT_OF_STATE[state], block)
                for block in layers
                for state in ordered
                if state in _COMPONENT_OF_STATE
            ],
            "inputs": [("block", block) for block in layers if "block_input" in states],
        }

    def __call__(self, site: str, block: int, tokens: torch.Tensor) -> None:
        if self.grid is not None:
            self.anatomy.image_tokens(tokens, block, self.grid)  # checks the token count
        state = "block_output" if site == "residual" else site
        if self.rebuild:
            self._follow_stream(state, block, tokens)
        if state in self.states:
            self.scores[(state, block)] = TokenScores.of(self.anatomy, tokens, self.labels)

    def _follow_stream(self, state: str, block: int, tokens: torch.Tensor) -> None:
        if state == "block_input":
            self.stream[block] = tokens
        elif state == "attention":
            self.stream[block] = self.stream[block] + tokens
            self.scores[("mlp_input", block)] = TokenScores.of(
                self.anatomy, self.stream[block], self.labels
            )
        elif state == "mlp":
            self.stream[block] = self.stream[block] + tokens
        else:
            rebuilt = self.stream.pop(block)
            tolerance = 1e-4 * float(tokens.abs().amax()) + 1e-6
            if not torch.allclose(rebuilt, tokens, rtol=1e-4, atol=tolerance):
                raise UnsupportedModelError(
                    f"block {block} of {type(self.anatomy.model).__name__} does not output its "
                    "input + attention branch + MLP branch (a post-norm block?), so the MLP's "
                    "input cannot be rebuilt from the captured branches"
                )


def token_scores(
    anatomy: ViTAnatomy,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[int],
    states: Collection[str],
    run: Callable[[torch.Tensor], Any] | None = None,
) -> tuple[dict[tuple[str, int], TokenScores], Any]:
    """Score token states of ``layers`` during one forward pass.

    Args:
        anatomy: The model's anatomy.
        inputs: Images (B, C, H, W), or a token sequence for ``run``.
        labels: (B,) class per image.
        layers: Blocks to read.
        states: Which of :data:`STATES` to score.
        run: Runs the forward pass on ``inputs`` (the token path's ``classify`` on a
            shortened sequence, say); default: the model on images, checking that it keeps
            one token per patch.

    Returns:
        ``({(state, block): TokenScores}, what the forward pass returned)``.

    Raises:
        UnsupportedModelError: If the tokens are not one per patch, or ``"mlp_input"`` is
            asked of blocks that are not ``x + attention + MLP``.
    """
    reader = _Reader(anatomy, labels, states, inputs if run is None else None)
    with torch.no_grad(), anatomy.capture(reduce=reader, **reader.sites(layers)):
        output = (anatomy.forward if run is None else run)(inputs)
    return reader.scores, output


def token_groups(anatomy: ViTAnatomy, groups: Sequence[str]) -> dict[str, Callable]:
    """``{group: select}`` with ``select(values (..., N)) -> (..., n)`` of a token group.

    Groups: ``"cls"`` (the [CLS] token the head reads, kept as a length-1 last dim),
    ``"image"`` (tokens after the prefix) and ``"all"`` (every token, prefix included).
    """
    cls, prefix = anatomy.readout.cls_index, anatomy.num_prefix_tokens
    select = {
        "cls": lambda values: values[..., cls : cls + 1],
        "image": lambda values: values[..., prefix:],
        "all": lambda values: values,
    }
    return {group: select[group] for group in groups}


def present_groups(anatomy: ViTAnatomy, groups: Sequence[str]) -> tuple[str, ...]:
    """``groups`` without ``"cls"`` where the head reads no [CLS] token (pooled heads)."""
    has_cls = anatomy.readout.cls_index is not None
    return tuple(group for group in groups if group != "cls" or has_cls)
