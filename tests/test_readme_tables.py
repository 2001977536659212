"""benchmarks/readme_tables.py: the result tables of the README and the docs are what the
committed JSON gives."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "readme_tables.py"
tables = runpy.run_path(str(SCRIPT))


def test_committed_readme_matches_committed_results():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


def run_fixture() -> dict:
    return {
        "sections": [
            {"name": "chefer2021/positive", "higher_is_better": False, "rule": "trapezoid_percent"},
            {"name": "road2022/combined", "higher_is_better": True, "rule": "mean"},
            {"name": "localisation/pointing_game", "higher_is_better": True, "rule": "mean"},
        ],
        "rows": [
            {
                "protocol": "chefer2021/positive",
                "method": "class_space",
                "auc": 48.375,
                "auc_low": 46.69,
                "auc_high": 49.99,
                "diff": None,
                "diff_low": None,
                "diff_high": None,
            },
            {
                "protocol": "road2022/combined",
                "method": "class_space",
                "auc": 0.01234,
                "auc_low": -0.0021,
                "auc_high": 0.0306,
                "diff": None,
                "diff_low": None,
                "diff_high": None,
            },
            {
                "protocol": "chefer2021/positive",
                "method": "random",
                "auc": 35.8,
                "auc_low": 34.3,
                "auc_high": 37.3,
                "diff": 12.575,
                "diff_low": 10.04,
                "diff_high": 14.96,
            },
            {
                "protocol": "localisation/pointing_game",
                "method": "random",
                "auc": 0.25,
                "auc_low": 0.2,
                "auc_high": 0.3,
                "diff": None,
                "diff_low": None,
                "diff_high": None,
            },
        ],
        "missing": [["road2022/combined", "random"]],
    }


def test_render_by_hand():
    run = run_fixture()
    assert tables["render"](run, "faithfulness") == (
        "| method | chefer2021/positive ↓ | road2022/combined ↑ |\n"
        "|---|---|---|\n"
        "| `class_space` | 48.4 [46.7, 50.0] | 0.012 [-0.002, 0.031] |\n"
        "| `random` | 35.8 [34.3, 37.3] | missing |\n"
    )
    assert tables["render"](run, "faithfulness-diff") == (
        "| method | chefer2021/positive ↓ | road2022/combined ↑ |\n"
        "|---|---|---|\n"
        "| `random` | 12.6 [10.0, 15.0] | missing |\n"
    )
    assert tables["render"](run, "localisation").splitlines()[0] == "| method | pointing_game ↑ |"
    with pytest.raises(ValueError, match="kind"):
        tables["render"](run, "speed")


def test_check_fails_on_a_stale_readme_and_writing_fixes_it(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"format": 2, "models": {"m": {"main": run_fixture()}}}))
    readme = tmp_path / "README.md"
    start, end = (
        "<!-- table:m/main/faithfulness:start -->",
        "<!-- table:m/main/faithfulness:end -->",
    )
    stale = f"intro\n{start}\n| old |\n{end}\nrest\n"
    readme.write_text(stale)
    arguments = ["--pages", str(readme), "--results", str(results)]
    assert tables["main"]([*arguments, "--check"]) == 1
    assert readme.read_text() == stale
    assert tables["main"](arguments) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- table:m/main/faithfulness:start -->\n| method |")
    assert text.endswith(
        "| `random` | 35.8 [34.3, 37.3] | missing |\n<!-- table:m/main/faithfulness:end -->\nrest\n"
    )
    assert tables["main"]([*arguments, "--check"]) == 0
    readme.write_text(stale.replace("m/main", "other/main"))
    assert tables["main"]([*arguments, "--check"]) == 2  # no such model in the JSON


def test_faithfulness_script_writes_what_the_tables_read(tiny_vit, tmp_path):
    from class_space_saliency.evaluation import run_benchmark
    from class_space_saliency.testing import box_masks, tiny_benchmark_data

    faithfulness = runpy.run_path(str(ROOT / "benchmarks" / "faithfulness.py"))
    model = tiny_vit("plain")
    images, labels = tiny_benchmark_data(4, model)
    report = run_benchmark(
        model,
        (images, labels, box_masks(images)),
        ["class_space", "random"],
        ["road2022", "vilas2023/positive"],
        (0.5,) * 3,
        (0.5,) * 3,
        tmp_path / "run",
        batch_size=3,
        progress=False,
    )  # fmt: skip  (the script summarises with the default n_boot too)
    path = tmp_path / "faithfulness.json"
    summary = faithfulness["summarize_folder"](tmp_path / "run")
    faithfulness["update_results"](path, "toy", {"main": summary})
    faithfulness["update_results"](path, "toy", {"ablation": summary})
    results = json.loads(path.read_text())
    assert set(results["models"]["toy"]) == {"main", "ablation"}  # runs are merged
    main = results["models"]["toy"]["main"]
    table = tables["render"](main, "faithfulness").splitlines()
    assert table[0] == (
        "| method | road2022/morf ↓ | road2022/lerf ↑ | road2022/combined ↑ "
        "| vilas2023/positive ↓ |"
    )
    row = next(r for r in report.rows if r.protocol == "road2022/morf" and r.method == "random")
    assert f"{row.auc:.3f} [{row.auc_low:.3f}, {row.auc_high:.3f}]" in table[3]
    assert tables["render"](main, "localisation").splitlines()[0] == (
        "| method | pointing_game ↑ | relevance_mass ↑ | relevance_rank ↑ | mask_auroc ↑ |"
    )
    assert len(tables["render"](main, "localisation-diff").splitlines()) == 3  # random only


def test_timings_table_reads_the_committed_measurements(tmp_path):
    timings = json.loads((ROOT / "benchmarks" / "results" / "timings.json").read_text())
    table = tables["render_timings"](timings)
    for row in timings["commands"].values():
        assert f"| `class-space-saliency {' '.join(row['arguments'])}` | " in table
    assert timings["machine"]["cpu"] in table
    # under a second, two decimals (0.04 s is not "0.0 s"); otherwise one
    timings["commands"] = {
        "help": {"arguments": ["--help"], "wall_seconds": 0.04, "cpu_seconds": 0.036},
        "demo": {"arguments": ["demo"], "wall_seconds": 16.96, "cpu_seconds": 16.87},
    }
    lines = tables["render_timings"](timings).splitlines()
    assert lines[2:4] == [
        "| `class-space-saliency --help` | 0.04 s | 0.04 s |",
        "| `class-space-saliency demo` | 17.0 s | 16.9 s |",
    ]


def test_diagnosis_tables_read_the_octiles():
    diagnosis = {
        "columns": ["object", "[CLS] attention", "logit drop"],
        "octiles": {
            method: [[50.0, 10.0 + i, 0.1 * i] for i in range(8)]
            for method in ("class_space", "class_space_contributions", "chefer", "random")
        },
    }
    assert tables["render_diagnosis"](diagnosis, "chefer").splitlines()[2] == (
        "| 1 | 50.0 | 10.0 | 0.000 |"
    )
    extremes = tables["render_diagnosis_extremes"](diagnosis).splitlines()
    assert len(extremes) == 2 + 4
    assert extremes[2] == "| `class_space` | 10.0 % | 0.000 | 17.0 % | 0.700 |"
