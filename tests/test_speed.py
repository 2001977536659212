"""benchmarks/speedkit: interleaved timing statistics and the met / missed / within-noise rule."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from speedkit.cells import Measurement
from speedkit.render import render_markdown, render_selected, render_targets, to_json
from speedkit.targets import RULE, TARGETS, Target, evaluate_targets, verdict
from speedkit.timing import (
    Repeats,
    Spread,
    divide,
    interleave,
    paired_difference,
    paired_ratio,
    summary,
    warm_up,
)
from speedkit.workloads import CAPTUM, MEASUREMENTS


class FakeClock:
    """A clock that only moves when a scripted call runs."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, durations: list[float]):
        def run() -> str:
            self.log.append(name)
            self.now += durations.pop(0)
            return name

        return run


def test_interleave_alternates_the_calls_and_times_each_round():
    clock = FakeClock()
    method = [9.0, 2.0, 4.0, 2.0, 2.0, 3.0]  # the first is the warm-up
    forward = [5.0, 1.0, 2.0, 1.0, 1.0, 1.0]
    calls = {"method": clock.call("method", method), "forward": clock.call("forward", forward)}
    round_s, outputs = warm_up(calls, clock=clock)
    assert (round_s, outputs) == (14.0, {"method": "method", "forward": "forward"})
    synced = []
    times = interleave(calls, 5, synchronize=lambda: synced.append(clock.now), clock=clock)
    assert clock.log == ["method", "forward"] * 6
    assert times == {"method": [2.0, 4.0, 2.0, 2.0, 3.0], "forward": [1.0, 2.0, 1.0, 1.0, 1.0]}
    assert len(synced) == 10
    # round 2 was twice as slow for both calls: the per-round ratios do not see it
    assert paired_ratio(times["method"], times["forward"]) == Spread(2.0, 2.0, 2.0)
    assert paired_difference(times["method"], times["forward"]) == Spread(1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="rounds"):
        interleave(calls, 0, clock=clock)


def test_summary_is_the_median_with_inclusive_quartiles():
    times = [0.5, 0.1, 0.4, 0.2, 0.3, 0.9]
    first, _, third = statistics.quantiles(times, n=4, method="inclusive")
    assert summary(times) == Spread(statistics.median(times), first, third)
    assert summary([0.3]) == Spread(0.3, 0.3, 0.3)


def test_paired_ratio_is_widened_to_contain_the_ratio_of_medians():
    method, forward = [1.0, 1.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0, 9.0]
    # per-round ratios 1, 1, 1/9, 1, 1: quartiles [1, 1]; ratio of medians 1/9
    assert paired_ratio(method, forward) == Spread(1 / 9, 1 / 9, 1.0)
    assert paired_ratio([1.0], [0.0]) is None
    with pytest.raises(ValueError, match="rounds"):
        paired_ratio([1.0, 2.0], [1.0])


def test_divide_crosses_the_ends():
    assert divide(Spread(2.0, 1.5, 3.0), Spread(1.0, 0.5, 2.0)) == Spread(2.0, 0.75, 6.0)
    assert divide(None, Spread.exact(1.0)) is None


def test_repeats_never_fewer_than_five_rounds_by_default():
    assert Repeats().count(100.0) == 5
    assert Repeats().count(1e-9) == 20
    assert Repeats(budget_s=3.0).count(0.5) == 6
    assert Repeats(fixed=7).count(100.0) == 7


@pytest.mark.parametrize(
    ("figure", "op", "limit", "expected"),
    [
        (Spread(1.00, 0.98, 1.04), "<=", 1.05, "met"),
        (Spread(1.00, 0.98, 1.05), "<=", 1.05, "met"),
        (Spread(1.00, 0.98, 1.07), "<=", 1.05, "within noise"),
        (Spread(1.10, 1.06, 1.20), "<=", 1.05, "missed"),
        (Spread(1.10, 1.05, 1.20), "<=", 1.05, "within noise"),
        (Spread(0.90, 0.80, 1.00), "<", 1.0, "within noise"),
        (Spread(1.00, 1.00, 1.10), "<", 1.0, "missed"),
        (Spread(3.00, 2.60, 3.40), ">=", 2.5, "met"),
        (Spread(2.40, 2.30, 2.60), ">=", 2.5, "within noise"),
        (Spread(2.00, 1.90, 2.40), ">=", 2.5, "missed"),
        (Spread.exact(1.2), "<=", 1.2, "met"),
        (None, "<=", 1.2, "n/a"),
    ],
)
def test_verdict_judges_only_beyond_the_interval(figure, op, limit, expected):
    assert verdict(figure, op, limit) == expected


def test_target_rejects_an_unknown_figure_or_comparison():
    with pytest.raises(ValueError, match="figure"):
        Target("speed", "class_space", "forward", "<=", 1.0)
    with pytest.raises(ValueError, match="op"):
        Target("time", "class_space", "forward", "==", 1.0)


def measurements(batch_size: int) -> list[Measurement]:
    """One configuration: forward 4 ms, class space 5 ms (6 ms in round 3), others 10 ms."""
    forward = [0.004, 0.004, 0.008, 0.004, 0.004]
    times = {
        "forward": forward,
        "class_space": [0.005, 0.005, 0.012, 0.006, 0.005],
        "class_space_all": [0.004, 0.004, 0.008, 0.0044, 0.004],
    }
    peaks = {"forward": 100, "class_space_all": 130}
    config = ("default", "cpu", "fp32", batch_size)
    return [
        Measurement(*config, name, times.get(name, [0.01] * 5), forward, peaks.get(name, 120))
        for name in MEASUREMENTS
    ]


def test_evaluate_targets_and_report():
    rows = measurements(1) + measurements(8)
    results = evaluate_targets(rows, [])
    by_name = {(r["target"], r["batch_size"]): r for r in results}
    overhead = by_name[("class_space time - forward", 1)]
    # medians 5 ms and 4 ms; per-round differences 1, 1, 4, 2, 1 ms -> quartiles [1, 2]
    assert overhead["value"] == pytest.approx(1.0)
    assert (overhead["low"], overhead["high"]) == pytest.approx((1.0, 2.0))
    assert (overhead["unit"], overhead["threshold"], overhead["verdict"]) == (
        " ms",
        "<= 1.0",
        "within noise",
    )
    assert ("class_space time - forward", 8) not in by_name  # batch 1 only
    one_block = by_name[("class_space time / forward", 1)]
    assert (one_block["value"], one_block["verdict"]) == (pytest.approx(1.25), "missed")
    all_blocks = by_name[("class_space_all time / forward", 8)]
    assert (all_blocks["low"], all_blocks["high"], all_blocks["verdict"]) == (1.0, 1.0, "met")
    memory = by_name[("class_space_all memory / forward", 1)]
    assert (memory["value"], memory["verdict"]) == (pytest.approx(1.3), "missed")
    captum = by_name[(f"class_space time / {CAPTUM}", 1)]
    # per-round ratios to the forward: class_space quartiles [1.25, 1.5], Captum [2.5, 2.5]
    # (its slow round, 1.25, lies outside) -> 0.5 [1.25 / 2.5, 1.5 / 2.5]
    assert (captum["value"], captum["low"], captum["high"]) == pytest.approx((0.5, 0.5, 0.6))
    assert captum["verdict"] == "met"
    assert not any("Spearman" in r["target"] for r in results)  # bf16 only
    expected = sum(t.figure in ("time", "memory") for t in TARGETS) * 2 + 1
    assert len(results) == expected
    meta = dict(torch="t", timm="t", captum="c", python="p", cpu="x", cpu_count=2)
    meta.update(torch_threads=2, gpu=None, duration_s=60.0)
    markdown = render_markdown(to_json(meta, rows, [], results))
    assert RULE in markdown
    assert (
        "| class_space time - forward | default | cpu | fp32 | 1 | 1.00 ms [1.00, 2.00]" in markdown
    )
    assert "| class_space | 5.0 ms [5.0, 6.0] | 1.25x [1.25, 1.50] | 0.0 MiB (1.20x) |" in markdown
    # the docs' selected tables (readme_tables.py all/speed/...) read the same report
    report = to_json(meta, rows, [], results)
    assert render_targets(report) in markdown
    time_table = render_selected(report, "time").splitlines()
    assert time_table[0].startswith("|  | default b=1 | default b=8")
    assert time_table[2].startswith("| forward | 4.0 ms |")
    assert time_table[3].startswith("| `class_space` | 1.25x [1.25, 1.50] |")
    assert render_selected(report, "memory").splitlines()[3].startswith("| `class_space` | 1.20x |")
    with pytest.raises(ValueError, match="quantity"):
        render_selected(report, "speed")
