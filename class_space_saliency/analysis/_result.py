"""What every analysis returns: ``to_dict()`` (JSON-safe), ``table()`` (markdown), ``plot()``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from ._stream import RankHistogram


class AnalysisResult:
    """Base of analysis results.

    Subclasses (dataclasses) implement :meth:`to_dict`, :meth:`table` and :meth:`plot`;
    ``print(result)`` shows the table and :meth:`save` writes all three next to each other.
    """

    name: ClassVar[str] = "analysis"
    """File stem of :meth:`save` and the section title of the ``analyze`` report."""

    def to_dict(self) -> dict:
        """Plain-Python view (lists, floats, strings) that ``json.dumps`` accepts."""
        raise NotImplementedError

    def table(self) -> str:
        """The result as a markdown table (or several, separated by blank lines)."""
        raise NotImplementedError

    def plot(self, ax: Any = None) -> Any:
        """The result drawn as the paper draws it; returns the matplotlib ``Figure``."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.table()

    def save(self, folder: str | Path, stem: str | None = None) -> list[Path]:
        """Write ``stem.json``, ``stem.md`` and ``stem.png`` to ``folder``.

        Args:
            folder: Output folder (created if needed).
            stem: File stem (default: the result's :attr:`name`).

        Returns:
            The written paths.
        """
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or self.name
        paths = [folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}.png"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        paths[1].write_text(self.table() + "\n")
        figure = self.plot()
        figure.savefig(paths[2], dpi=150, bbox_inches="tight")
        plt.close(figure)
        return paths


def json_safe(value: Any, digits: int = 6) -> Any:
    """Tensors, arrays and NumPy scalars as lists and Python numbers, floats rounded.

    NaN and infinities become ``None`` (JSON has neither).

    Example:
        >>> json_safe({"rate": torch.tensor([1 / 3, float("nan")]), "n": np.int64(2)})
        {'rate': [0.333333, None], 'n': 2}
    """
    if isinstance(value, torch.Tensor | np.ndarray):
        return json_safe(value.tolist(), digits)
    if isinstance(value, np.generic):
        return json_safe(value.item(), digits)
    if isinstance(value, dict):
        return {str(k): json_safe(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, digits) for v in value]
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, digits)
    return value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A markdown table; floats with ``digits`` decimals, ``None`` and NaN as ``–``.

    Example:
        >>> print(markdown_table(["layer", "rate"], [[0, 12.345], [1, None]]))
        | layer | rate |
        |---|---|
        | 0 | 12.35 |
        | 1 | – |
    """

    def cell(value: Any) -> str:
        if isinstance(value, torch.Tensor | np.generic):
            value = value.item()
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_p_value(p: float | None) -> str:
    """``p < 0.001`` style for tables; ``–`` where there is no test.

    Example:
        >>> format_p_value(0.00002), format_p_value(0.0412)
        ('<0.001', '0.041')
    """
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def draw_rank_boxes(
    axis: Any, histograms: Mapping[str, RankHistogram], colours: Mapping[str, str]
) -> None:
    """Box plots of the normalised rank per block, one box per histogram side by side.

    Boxes span the quartiles, whiskers the 5th and 95th percentiles; black lines are the
    medians, black dots the means;
    block ``i`` is drawn at x = ``i``. Each histogram gets a legend entry ``"{key} tokens"``.

    Args:
        axis: A matplotlib ``Axes``.
        histograms: ``{label: RankHistogram}`` with the same blocks.
        colours: ``{label: colour}``.
    """
    count = len(histograms)
    offsets = np.linspace(-0.2, 0.2, count) if count > 1 else [0.0]
    for offset, (label, histogram) in zip(offsets, histograms.items(), strict=True):
        quantiles = histogram.quantiles([0.05, 0.25, 0.5, 0.75, 0.95]).numpy()
        stats = [
            dict(whislo=a, q1=b, med=c, q3=d, whishi=e, fliers=[]) for a, b, c, d, e in quantiles
        ]
        positions = np.arange(len(quantiles)) + offset
        boxes = axis.bxp(
            stats,
            positions=positions,
            widths=0.35,
            patch_artist=True,
            showfliers=False,
            medianprops=dict(color="black"),
        )
        for box in boxes["boxes"]:
            box.set_facecolor(colours[label])
        axis.plot(positions, histogram.mean_rank().numpy(), "k.", ms=4)
        axis.plot([], [], "s", color=colours[label], label=f"{label} tokens")
