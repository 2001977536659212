"""benchmarks/analysis_tables.py: the docs' analysis tables are what the committed runs stored."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "analysis_tables.py"


def test_committed_pages_match_the_committed_runs():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_marked_table_is_the_stored_table_of_that_analysis():
    tables = runpy.run_path(str(SCRIPT))
    start, end = (
        "<!-- analysis:fashion/patching:start -->",
        "<!-- analysis:fashion/patching:end -->",
    )
    page = f"before\n{start}\nold\n{end}\n"
    rendered = tables["render"](page)
    stored = json.loads((ROOT / "benchmarks/results/analysis_fashion/analysis.json").read_text())
    assert rendered.startswith(f"before\n{start}\n")
    assert stored["analyses"]["patching"]["table"].strip() in rendered
    assert "old" not in rendered and rendered.endswith(f"{end}\n")
