"""benchmarks/readme_tables.py verdict tables: better/worse only where the interval excludes 0."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "readme_tables.py"
tables = runpy.run_path(str(SCRIPT))
DOWN = "vilas2023/positive"  # lower is better


def comparison(protocol: str, method: str, low: float, high: float) -> dict:
    """A row whose paired difference ``reference - method`` has the interval [low, high]."""
    return {
        "protocol": protocol,
        "method": method,
        "auc": 0.5,
        "auc_low": 0.4,
        "auc_high": 0.6,
        "diff": (low + high) / 2,
        "diff_low": low,
        "diff_high": high,
    }


def reference(protocol: str, method: str) -> dict:
    return {**comparison(protocol, method, 0, 0), "diff": None, "diff_low": None, "diff_high": None}


@pytest.fixture
def run() -> dict:
    down, up = DOWN, "vilas2023/negative"
    return {
        "sections": [
            {"name": down, "higher_is_better": False, "rule": "vilas2023"},
            {"name": up, "higher_is_better": True, "rule": "vilas2023"},
        ],
        "rows": [
            reference(down, "class_space"),
            reference(up, "class_space"),
            comparison(down, "a", 0.01, 0.05),  # class_space higher on a lower-is-better curve
            comparison(up, "a", 0.01, 0.05),  # class_space higher on a higher-is-better curve
            comparison(down, "b", -0.05, -0.01),
            comparison(up, "b", -0.01, 0.02),  # the interval covers zero
        ],
        "rows_vs_random": [
            comparison(down, "class_space", -0.05, -0.01),
            comparison(up, "class_space", -0.05, -0.001),
            reference(down, "random"),
            reference(up, "random"),
        ],
        "missing": [],
    }


def test_verdicts_follow_the_curve_direction_and_the_interval(run):
    assert tables["render"](run, "faithfulness-verdict") == (
        "| method | vilas2023/positive ↓ | vilas2023/negative ↑ "
        "| better / tie / worse / fragile |\n"
        "|---|---|---|---|\n"
        "| `a` | better | worse | 1 / 0 / 1 / 0 |\n"
        "| `b` | worse | tie | 0 / 1 / 1 / 0 |\n"
    )


@pytest.mark.parametrize("reference", ["random", "chefer", "class_space_gradient_paper"])
def test_versus_random_and_chefer_read_their_own_rows(run, reference):
    key = f"rows_vs_{reference}"
    run[key] = [{**row, "method": row["method"].replace("random", reference)}
                for row in run["rows_vs_random"]]  # fmt: skip
    assert tables["render"](run, f"faithfulness-vs-{reference}").splitlines()[2:] == [
        "| `class_space` | worse | better | 1 / 0 / 1 / 0 |"
    ]
    del run[key]
    with pytest.raises(ValueError, match=key):
        tables["render"](run, f"faithfulness-vs-{reference}")


def test_unknown_suffix_is_refused(run):
    with pytest.raises(ValueError, match="kind"):
        tables["render"](run, "faithfulness-verdicts")


def test_shift_gives_auc_moves_and_changed_verdicts(run):
    import copy

    old = copy.deepcopy(run)
    new = copy.deepcopy(run)
    # the rerun moves a's AUC on the lower-is-better curve by -0.125 and its interval to 0
    a_down = next(
        r for r in new["rows"] if r["method"] == "a" and r["protocol"] == "vilas2023/positive"
    )
    a_down.update(auc=0.375, diff_low=-0.01, diff_high=0.02)
    assert tables["render_shift"](new, old).splitlines() == [
        "| method | vilas2023/positive | vilas2023/negative |",
        "|---|---|---|",
        "| `class_space` | +0.000 | +0.000 |",
        "| `a` | -0.125 (vs class_space: better → tie) | +0.000 |",
        "| `b` | +0.000 | +0.000 |",
    ]


def test_fragile_verdicts_are_marked_and_derived_columns_not_counted(run):
    run["sections"].append({"name": "road2022/combined", "higher_is_better": True,
                            "rule": "mean", "derived": True})  # fmt: skip
    a_up = next(r for r in run["rows"] if (r["method"], r["protocol"]) == ("a", DOWN))
    a_up["fragile"] = True
    run["rows"].append(comparison("road2022/combined", "a", 0.01, 0.05))  # worse, not counted
    run["rows_correct"] = run["rows"]
    for kind in ("faithfulness-verdict", "faithfulness-correct"):
        lines = tables["render"](run, kind).splitlines()
        assert lines[0].endswith(
            "| road2022/combined ↑ (derived) | better / tie / worse / fragile |"
        )
        assert lines[2] == "| `a` | (better) | worse | worse | 0 / 0 / 1 / 1 |"
    del run["rows_correct"]
    with pytest.raises(ValueError, match="rows_correct"):
        tables["render"](run, "faithfulness-correct")


def test_upsample_shift_compares_the_nearest_run_with_the_bilinear_one(run):
    import copy

    nearest = copy.deepcopy(run)
    row = next(r for r in nearest["rows"] if (r["method"], r["protocol"]) == ("a", DOWN))
    row.update(auc=0.375, diff_low=-0.01, diff_high=0.02)
    for version in (run, nearest):  # a method with rows for one curve only
        version["rows"].append(comparison(DOWN, "random_shared", -0.1, -0.05))
    results = {"models": {"m": {"main": run, "main_nearest": nearest}}}
    marker = "<!-- table:m/main/upsample-shift:{} -->"
    readme = marker.format("start") + "\n" + marker.format("end") + "\n"
    filled = tables["fill"](readme, results)
    assert "| `a` | -0.125 (vs class_space: better → tie) | +0.000 |" in filled
    assert "| `random_shared` | +0.000 |  |" in filled
    with pytest.raises(ValueError, match="main_nearest"):
        tables["fill"](readme, {"models": {"m": {"main": run}}})
