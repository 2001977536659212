"""Timing: warm-up, interleaved timed rounds, and their medians, quartiles and paired ratios.

A cell times several calls (a method and the plain forward, say) in rounds: every round
calls each of them once, in order, so slow periods of a shared machine hit all of them
alike. Each figure is reported as its median with the interquartile range, and a ratio
(or difference) of two calls of the same cell as the ratio of their medians with the
interquartile range of the per-round ratios as its spread.
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Clock = Callable[[], float]
"""Seconds from an arbitrary origin (``time.perf_counter``)."""


@dataclass(frozen=True)
class Repeats:
    """How many timed rounds follow the warm-up: fixed, or as many as fit a time budget.

    Attributes:
        fixed: Exactly this many rounds, or ``None`` to use the budget.
        budget_s: Seconds of timed rounds to aim for, estimated from the warm-up round.
        least: Fewest rounds under the budget rule.
        most: Most rounds under the budget rule.

    Example:
        >>> Repeats(budget_s=3.0).count(0.1)
        20
        >>> Repeats(budget_s=3.0).count(1.4)
        5
    """

    fixed: int | None = None
    budget_s: float = 3.0
    least: int = 5
    most: int = 20

    def count(self, round_s: float) -> int:
        """Timed rounds for a cell whose warm-up round took ``round_s`` seconds."""
        if self.fixed is not None:
            return self.fixed
        wanted = math.ceil(self.budget_s / max(round_s, 1e-6))
        return max(self.least, min(self.most, wanted))


def timed(
    call: Callable[[], object],
    synchronize: Callable[[], None] | None = None,
    clock: Clock = time.perf_counter,
) -> tuple[float, object]:
    """Run ``call`` once.

    Args:
        call: The call.
        synchronize: Waits for queued device work (``torch.cuda.synchronize``), or ``None``.
        clock: The clock.

    Returns:
        ``(seconds, the call's output)``.

    Example:
        >>> seconds, logits = timed(lambda: model(images))
    """
    start = clock()
    output = call()
    if synchronize is not None:
        synchronize()
    return clock() - start, output


def warm_up(
    calls: Mapping[str, Callable[[], object]],
    synchronize: Callable[[], None] | None = None,
    clock: Clock = time.perf_counter,
) -> tuple[float, dict[str, object]]:
    """Call each of ``calls`` once (lazy initialisation, caches), untimed for the results.

    Args:
        calls: Name -> call.
        synchronize: See :func:`timed`.
        clock: The clock.

    Returns:
        ``(seconds of the whole round, name -> output)``.

    Example:
        >>> round_s, outputs = warm_up({"forward": lambda: model(images)})
    """
    total, outputs = 0.0, {}
    for name, call in calls.items():
        seconds, outputs[name] = timed(call, synchronize, clock)
        total += seconds
    return total, outputs


def interleave(
    calls: Mapping[str, Callable[[], object]],
    rounds: int,
    synchronize: Callable[[], None] | None = None,
    clock: Clock = time.perf_counter,
) -> dict[str, list[float]]:
    """Time ``calls`` in ``rounds`` rounds; each round calls each of them once, in order.

    Args:
        calls: Name -> call (warmed up).
        rounds: Number of rounds (at least 1).
        synchronize: See :func:`timed`.
        clock: The clock.

    Returns:
        Name -> seconds of its call in each round; entry ``i`` of every list is round ``i``.

    Raises:
        ValueError: If ``rounds`` is below 1 or ``calls`` is empty.

    Example:
        >>> times = interleave({"method": explain, "forward": forward}, rounds=5)
    """
    if rounds < 1 or not calls:
        raise ValueError(f"need calls and rounds >= 1, got {len(calls)} calls, {rounds} rounds")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(timed(call, synchronize, clock)[0])
    return times


@dataclass(frozen=True)
class Spread:
    """A figure with the interval that the timing noise leaves it.

    Attributes:
        value: The figure (a median, or a ratio or difference of medians).
        low: Lower end of the interval.
        high: Upper end of the interval.
    """

    value: float
    low: float
    high: float

    @classmethod
    def exact(cls, value: float) -> Spread:
        """A figure measured once (memory, a correlation): no interval around it."""
        return cls(value, value, value)

    def scaled(self, factor: float) -> Spread:
        """Every end times ``factor`` (> 0), e.g. seconds to milliseconds."""
        return Spread(self.value * factor, self.low * factor, self.high * factor)


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method; both the value itself for one value)."""
    if len(values) == 1:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, third


def summary(times: Sequence[float]) -> Spread:
    """Median of ``times`` with its interquartile range.

    Example:
        >>> summary([1.0, 2.0, 3.0, 4.0, 10.0])
        Spread(value=3.0, low=2.0, high=4.0)
    """
    return Spread(statistics.median(times), *_quartiles(times))


def _paired(
    first: Sequence[float],
    second: Sequence[float],
    value: float,
    per_round: Callable[[float, float], float],
) -> Spread:
    if len(first) != len(second) or not first:
        raise ValueError(f"need as many rounds of each call, got {len(first)} and {len(second)}")
    low, high = _quartiles([per_round(a, b) for a, b in zip(first, second, strict=True)])
    return Spread(value, min(low, value), max(high, value))


def paired_ratio(first: Sequence[float], second: Sequence[float]) -> Spread | None:
    """``median(first) / median(second)`` with the quartiles of the per-round ratios.

    The interval is widened to contain the ratio of medians where it falls outside.

    Args:
        first: Seconds of one call per round.
        second: Seconds of the other call in the same rounds.

    Returns:
        The ratio, or ``None`` where a time is not positive.

    Example:
        >>> paired_ratio([2.0, 2.2, 2.0, 2.4, 2.6], [1.0, 1.0, 1.0, 1.0, 1.0])
        Spread(value=2.2, low=2.0, high=2.4)
    """
    if min(second, default=0.0) <= 0:
        return None
    value = statistics.median(first) / statistics.median(second)
    return _paired(first, second, value, operator.truediv)


def paired_difference(first: Sequence[float], second: Sequence[float]) -> Spread:
    """``median(first) - median(second)`` with the quartiles of the per-round differences.

    The interval is widened to contain the difference of medians where it falls outside.

    Example:
        >>> paired_difference([5.0, 6.0, 5.0, 7.0, 5.0], [4.0, 4.0, 4.0, 4.0, 5.0])
        Spread(value=1.0, low=1.0, high=2.0)
    """
    value = statistics.median(first) - statistics.median(second)
    return _paired(first, second, value, operator.sub)


def divide(first: Spread | None, second: Spread | None) -> Spread | None:
    """The quotient of two positive figures from different cells, ends crossed.

    Example:
        >>> divide(Spread(2.0, 1.8, 2.2), Spread(1.0, 0.9, 1.1)).high
        2.4444444444444446
    """
    if first is None or second is None or second.low <= 0 or first.low < 0:
        return None
    return Spread(first.value / second.value, first.low / second.high, first.high / second.low)
