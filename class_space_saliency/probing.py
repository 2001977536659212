"""Fitted linear probes of token states: what ``analysis.linear_probes`` fits and methods read.

A probe maps a token state ``x`` (D,) to class scores ``W x + b`` (C,). :class:`LinearProbes`
holds one probe per block, component (``"residual"``, ``"attention"``, ``"mlp"``) and token
position (one per position, as the official ``linear_probing/prober.py``, and/or one
``"pooled"`` probe fitted on the image tokens of every position), scores token states with
them, and saves and loads them (a ``torch.save`` file of tensors, lists and numbers, read
back with ``weights_only=True``).

Example:
    >>> from class_space_saliency.probing import LinearProbes
    >>> probes = LinearProbes(torch.zeros(1, 1, 2, 3, 4), torch.zeros(1, 1, 2, 3), blocks=[5],
    ...                       components=["residual"], positions=[0, "pooled"])
    >>> probes.logits(torch.randn(8, 2, 4), block=5, component="residual", position="pooled").shape
    torch.Size([8, 2, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ._validation import check_choice
from .anatomy import COMPONENTS

POOLED = "pooled"
"""The position of a probe fitted on the image tokens of every position."""

PER_TOKEN = "per_token"
"""Scoring each token with the probe of its own position."""

FORMAT = "class_space_saliency.LinearProbes/1"
"""Marks a saved probes file (and its layout version)."""

FILE_NAME = "linear_probes.pt"
"""The probes file :meth:`LinearProbes.load` looks for in a folder."""


class LinearProbes:
    """Linear probes of token states per block, component and token position.

    Args:
        weights: (L, K, P, C, D) probe weights.
        biases: (L, K, P, C) probe biases.
        blocks: The L block indices, in order.
        components: The K components (of ``"residual"``, ``"attention"``, ``"mlp"``).
        positions: The P positions: token indices (0 = the first prefix token) and/or
            :data:`POOLED`.
        alpha: The ridge penalty they were fitted with.
        num_images: Training images.
        num_prefix_tokens: Prefix tokens of the model ([CLS], registers): pooled probes
            were fitted on the tokens after them.

    Raises:
        ValueError: For shapes that do not match the labels, or repeated labels.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        biases: torch.Tensor,
        blocks: Sequence[int],
        components: Sequence[str],
        positions: Sequence[int | str],
        *,
        alpha: float = 1.0,
        num_images: int = 0,
        num_prefix_tokens: int = 1,
    ) -> None:
        self.blocks = tuple(int(b) for b in blocks)
        self.components = tuple(components)
        self.positions = tuple(p if p == POOLED else int(p) for p in positions)
        for name, labels in (
            ("blocks", self.blocks),
            ("components", self.components),
            ("positions", self.positions),
        ):
            if len(set(labels)) != len(labels) or not labels:
                raise ValueError(f"{name} must be distinct and not empty, got {labels}")
        for component in self.components:
            check_choice("components", component, COMPONENTS)
        shape = (len(self.blocks), len(self.components), len(self.positions))
        if weights.dim() != 5 or tuple(weights.shape[:3]) != shape:
            raise ValueError(
                f"weights must have shape (L, K, P, C, D) with (L, K, P) = {shape}, "
                f"got {tuple(weights.shape)}"
            )
        if tuple(biases.shape) != tuple(weights.shape[:4]):
            raise ValueError(
                f"biases must have shape {tuple(weights.shape[:4])}, got {tuple(biases.shape)}"
            )
        self.weights = weights
        self.biases = biases
        self.alpha = float(alpha)
        self.num_images = int(num_images)
        self.num_prefix_tokens = int(num_prefix_tokens)

    @property
    def num_classes(self) -> int:
        """Classes ``C`` the probes score."""
        return self.weights.shape[3]

    @property
    def width(self) -> int:
        """Token state width ``D``."""
        return self.weights.shape[4]

    @property
    def token_positions(self) -> tuple[int, ...]:
        """The token positions with a probe of their own (``positions`` without pooled)."""
        return tuple(p for p in self.positions if p != POOLED)

    def __repr__(self) -> str:
        return (
            f"LinearProbes(blocks={list(self.blocks)}, components={list(self.components)}, "
            f"positions={_describe(self.positions)}, classes={self.num_classes}, "
            f"width={self.width}, alpha={self.alpha:g}, num_images={self.num_images})"
        )

    def to(self, device: torch.device | str) -> LinearProbes:
        """The probes with their tensors on ``device`` (self where they are there already)."""
        if self.weights.device == torch.device(device):
            return self
        return LinearProbes(
            self.weights.to(device),
            self.biases.to(device),
            self.blocks,
            self.components,
            self.positions,
            alpha=self.alpha,
            num_images=self.num_images,
            num_prefix_tokens=self.num_prefix_tokens,
        )

    def probe(
        self, block: int, component: str, position: int | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (C, D), bias (C,))`` of one probe.

        Raises:
            ValueError: For a block, component or position the probes do not hold.
        """
        i, j = self._site(block, component)
        if position not in self.positions:
            raise ValueError(f"no probe at position {position!r}; positions: {self.positions}")
        p = self.positions.index(position)
        return self.weights[i, j, p], self.biases[i, j, p]

    def logits(
        self,
        tokens: torch.Tensor,
        block: int,
        component: str,
        position: str = PER_TOKEN,
        start: int = 0,
    ) -> torch.Tensor:
        """Class scores of token states under the probes of one block and component.

        Args:
            tokens: Token states (B, N, D): the tokens at positions ``start`` .. ``start+N-1``.
            block: The block the states come from.
            component: Their component.
            position: :data:`PER_TOKEN` (each token through the probe of its own position)
                or :data:`POOLED` (every token through the pooled probe).
            start: The position of the first token (e.g. ``num_prefix_tokens`` for image
                tokens only).

        Returns:
            (B, N, C) scores, float32.

        Raises:
            ValueError: For a width that differs from the probes', or positions without a
                probe.
        """
        i, j = self._site(block, component)
        if tokens.dim() != 3 or tokens.shape[-1] != self.width:
            raise ValueError(
                f"tokens must have shape (B, N, {self.width}) for these probes, got "
                f"{tuple(tokens.shape)}"
            )
        check_choice("position", position, (PER_TOKEN, POOLED))
        tokens = tokens.float()
        if position == POOLED:
            weight, bias = self.probe(block, component, POOLED)
            return tokens @ weight.to(tokens.device).T + bias.to(tokens.device)
        wanted = list(range(start, start + tokens.shape[1]))
        missing = sorted(set(wanted) - set(self.token_positions))
        if missing:
            raise ValueError(
                f"no probes at token positions {missing[:5]}{'…' if len(missing) > 5 else ''}: "
                f"these probes hold positions {_describe(self.token_positions)} (fitted on "
                f"inputs with another token count?); use position='pooled'"
            )
        index = torch.tensor([self.positions.index(p) for p in wanted])
        weights = self.weights[i, j, index].to(tokens.device)  # (N, C, D)
        biases = self.biases[i, j, index].to(tokens.device)  # (N, C)
        return torch.einsum("bnd,ncd->bnc", tokens, weights) + biases

    def save(self, path: str | Path) -> Path:
        """Write the probes to ``path`` (a file; a folder gets :data:`FILE_NAME` in it)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            dict(
                format=FORMAT,
                weights=self.weights.detach().cpu(),
                biases=self.biases.detach().cpu(),
                blocks=list(self.blocks),
                components=list(self.components),
                positions=list(self.positions),
                alpha=self.alpha,
                num_images=self.num_images,
                num_prefix_tokens=self.num_prefix_tokens,
            ),
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> LinearProbes:
        """Read probes written by :meth:`save` (or a folder holding :data:`FILE_NAME`).

        Raises:
            FileNotFoundError: If there is no such file.
            ValueError: If the file does not hold probes.
        """
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no probes file at {path}")
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} does not hold LinearProbes (format {FORMAT!r})")
        return cls(
            state["weights"],
            state["biases"],
            state["blocks"],
            state["components"],
            state["positions"],
            alpha=state["alpha"],
            num_images=state["num_images"],
            num_prefix_tokens=state["num_prefix_tokens"],
        )

    def _site(self, block: int, component: str) -> tuple[int, int]:
        if block not in self.blocks:
            raise ValueError(f"no probes for block {block}; blocks: {list(self.blocks)}")
        if component not in self.components:
            raise ValueError(
                f"no probes for component {component!r}; components: {list(self.components)}"
            )
        return self.blocks.index(block), self.components.index(component)


def _describe(positions: Sequence[int | str]) -> str:
    """``0..49 + pooled`` for long runs of positions."""
    tokens = [p for p in positions if p != POOLED]
    parts = [str(tokens)] if tokens else []
    if len(tokens) > 3 and tokens == list(range(tokens[0], tokens[-1] + 1)):
        parts = [f"{tokens[0]}..{tokens[-1]}"]
    return " + ".join([*parts, *([POOLED] if POOLED in positions else [])])
