"""The benchmark's targets, in one table, and the rule that judges them beyond noise."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from .cells import CurveTiming, Measurement
from .timing import Spread, divide, paired_difference, paired_ratio
from .workloads import CAPTUM, PIXEL_STEPS

RULE = (
    "A target is met when its whole interval satisfies it, missed when no point of the "
    "interval does, and within noise otherwise. A time figure is the ratio (or difference) of "
    "the medians of two calls alternated in the same rounds, and its interval the "
    "interquartile range of the per-round ratios (differences), widened to contain the figure; "
    "a ratio of two methods timed in different cells (each alternated with the forward) is "
    "the quotient of their ratios to the forward, its interval the quotient of their intervals "
    "with the ends crossed. Memory and Spearman figures are single measurements (no interval)."
)
"""The verdict rule, as the report states it."""

COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}
FIGURES = {
    "time": ("time / ", "x"),
    "overhead": ("time - ", " ms"),
    "memory": ("memory / ", "x"),
    "spearman": ("bf16 vs fp32 min per-image Spearman", ""),
    "curves": ("curves / ", "x"),
}
"""Figure -> (label between the names, unit)."""


@dataclass(frozen=True)
class Target:
    """One target of the benchmark.

    Attributes:
        figure: ``"time"`` (ratio of median times), ``"overhead"`` (median time minus the
            forward's, in ms), ``"memory"`` (ratio of peaks), ``"spearman"`` (least
            per-image Spearman correlation of the bf16 output with fp32's) or ``"curves"``
            (ratio of two presets' curve times).
        numerator: A measurement or a curve preset.
        denominator: Another (``"forward"`` for ``overhead``, ``""`` for ``spearman``).
        op: ``"<="``, ``"<"`` or ``">="``.
        limit: The threshold.
        where: Only configurations with these ``(key, value)`` pairs (keys ``model``,
            ``device``, ``dtype``, ``batch_size``); every one if empty.

    Example:
        >>> Target("time", "class_space", "forward", "<=", 1.05).label
        'class_space time / forward'
    """

    figure: str
    numerator: str
    denominator: str
    op: str
    limit: float
    where: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.figure not in FIGURES or self.op not in COMPARE:
            raise ValueError(f"figure must be one of {list(FIGURES)} and op one of "
                             f"{list(COMPARE)}, got {self.figure!r} and {self.op!r}")  # fmt: skip

    @property
    def label(self) -> str:
        """How the report names the target."""
        return f"{self.numerator} {FIGURES[self.figure][0]}{self.denominator}"

    @property
    def unit(self) -> str:
        """Unit suffix of the figure's value."""
        return FIGURES[self.figure][1]

    def applies(self, config: dict) -> bool:
        """Whether the target concerns the configuration ``config``."""
        return all(config[key] == value for key, value in self.where)


BF16 = (("dtype", "bf16"),)
TARGETS = (
    Target("time", "class_space", "forward", "<=", 1.05),
    Target("time", "class_space_all", "forward", "<=", 1.15),
    Target("memory", "class_space_all", "forward", "<=", 1.2),
    Target("time", "class_space", CAPTUM, "<", 1.0),
    Target("time", "chefer", "class_space", ">=", 2.5),
    Target(
        "overhead",
        "class_space",
        "forward",
        "<=",
        1.0,
        where=(("model", "default"), ("device", "cpu"), ("dtype", "fp32"), ("batch_size", 1)),
    ),
    Target("spearman", "class_space", "", ">=", 0.99, where=BF16),
    Target("spearman", "class_space_all", "", ">=", 0.99, where=BF16),
    Target("curves", "vilas2023", PIXEL_STEPS, "<=", 0.6),
)
"""Every target: per (model, device, dtype, batch size) for measurements, per (model,
device) for curves. ``overhead`` is ``ClassSpaceSaliency.attribute``'s cost on top of the
forward at batch 1 on the embedded model."""


def verdict(figure: Spread | None, op: str, limit: float) -> str:
    """``"met"``, ``"missed"`` or ``"within noise"`` by :data:`RULE`; ``"n/a"`` if undefined.

    Example:
        >>> verdict(Spread(1.0, 0.98, 1.07), "<=", 1.05)
        'within noise'
    """
    if figure is None:
        return "n/a"
    worst, best = (figure.high, figure.low) if op in ("<=", "<") else (figure.low, figure.high)
    if COMPARE[op](worst, limit):
        return "met"
    return "within noise" if COMPARE[op](best, limit) else "missed"


def _time_ratio(row: Measurement) -> Spread | None:
    return paired_ratio(row.times_s, row.forward_s)


def measurement_figure(target: Target, rows: dict[str, Measurement]) -> Spread | None:
    """The figure of a measurement ``target`` in one configuration (name -> measurement)."""
    top = rows[target.numerator]
    if target.figure == "spearman":
        least = (top.spearman_vs_fp32 or {}).get("min")
        return None if least is None else Spread.exact(least)
    bottom = rows[target.denominator]
    if target.figure == "overhead":
        if target.denominator != "forward":
            raise ValueError(f"an overhead is measured on the forward, got {target.denominator}")
        return paired_difference(top.times_s, top.forward_s).scaled(1e3)
    if target.figure == "memory":
        peaks = top.peak_bytes, bottom.peak_bytes
        return Spread.exact(peaks[0] / peaks[1]) if peaks[1] > 0 else None
    return divide(_time_ratio(top), _time_ratio(bottom))


def _row(target: Target, config: dict, figure: Spread | None) -> dict:
    ends = dict(value=None, low=None, high=None) if figure is None else vars(figure)
    return dict(
        target=target.label,
        **config,
        **ends,
        unit=target.unit,
        threshold=f"{target.op} {target.limit}",
        verdict=verdict(figure, target.op, target.limit),
    )


def evaluate_targets(
    measurements: Sequence[Measurement], curves: Sequence[CurveTiming]
) -> list[dict]:
    """Judge every target of :data:`TARGETS` that applies, in every configuration measured.

    Args:
        measurements: All measurements.
        curves: All curve timings.

    Returns:
        Rows ``{target, model, device, dtype, batch_size, value, low, high, unit,
        threshold, verdict}``; the figure's ends are ``None`` where it is undefined.

    Example:
        >>> missed = [t for t in evaluate_targets(rows, curves) if t["verdict"] == "missed"]
    """
    groups: dict[tuple, dict[str, Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.group, {})[m.name] = m
    checks = []
    for group, rows in groups.items():
        config = dict(zip(("model", "device", "dtype", "batch_size"), group, strict=True))
        for target in TARGETS:
            if target.figure != "curves" and target.applies(config):
                checks.append(_row(target, config, measurement_figure(target, rows)))
    cells: dict[tuple, dict[str, CurveTiming]] = {}
    for c in curves:
        cells.setdefault((c.model, c.device), {})[c.name] = c
    for (model, device), cell in cells.items():
        some = next(iter(cell.values()))
        config = dict(model=model, device=device, dtype="fp32", batch_size=some.images)
        for target in TARGETS:
            if target.figure == "curves" and target.applies(config):
                top, bottom = cell[target.numerator], cell[target.denominator]
                checks.append(_row(target, config, paired_ratio(top.times_s, bottom.times_s)))
    return checks
