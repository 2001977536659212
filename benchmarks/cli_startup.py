"""How long the command line takes to answer: ``--help`` and the demo.

Each command runs in a fresh Python process (``python -m class_space_saliency ...``) from the
given checkout (``--checkout``, default: this one), ``--repeats`` times; the table reports the
median and the range of the wall time and of the process's CPU time (user + system, which
depends less on what else the machine runs), and which heavy modules (torch, timm,
matplotlib, transformers, numpy, cv2) the parse imported. Target: ``--help`` of every command
in under a second, without importing any of them.

Writes ``benchmarks/results/cli_startup.json`` (``--out``) and prints the table. Pass
``--checkout`` of an older commit (e.g. a ``git worktree``) to measure it the same way.

Example:
    python benchmarks/cli_startup.py                   # --help x 5, the demo x 3
    python benchmarks/cli_startup.py --checkout ../old --out /tmp/old.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "matplotlib", "transformers", "open_clip", "numpy", "cv2")
HELP_COMMANDS = (["--help"], ["attribute", "--help"], ["benchmark", "--help"])
TARGET_SECONDS = 1.0

IMPORTS_AFTER_HELP = """
import json, runpy, sys
sys.argv = ["class_space_saliency", *sys.argv[1:]]
try:
    runpy.run_module("class_space_saliency", run_name="__main__")
except SystemExit:
    pass
print("MODULES=" + json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def run_timed(argv: list[str], checkout: Path, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of ``python -m class_space_saliency argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "class_space_saliency", *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def heavy_imports(argv: list[str], checkout: Path, cwd: Path) -> list[str]:
    """The heavy modules a process has imported after answering ``argv``."""
    ran = subprocess.run(
        [sys.executable, "-c", IMPORTS_AFTER_HELP, *argv],
        cwd=cwd,  # not this checkout's folder: ``-c`` puts the working folder first on sys.path
        env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        check=True,
    )
    line = [row for row in ran.stdout.splitlines() if row.startswith("MODULES=")][-1]
    return sorted(set(json.loads(line.removeprefix("MODULES="))) & set(HEAVY))


def summarise(samples: list[tuple[float, float]]) -> dict:
    walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
    return dict(
        wall_median_s=round(statistics.median(walls), 3),
        wall_range_s=[round(min(walls), 3), round(max(walls), 3)],
        cpu_median_s=round(statistics.median(cpus), 3),
        repeats=len(samples),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each --help")
    parser.add_argument("--demo-repeats", type=int, default=3, help="runs of the demo (0: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cli_startup.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for argv in HELP_COMMANDS:
            samples = [run_timed(argv, args.checkout, Path(scratch)) for _ in range(args.repeats)]
            heavy = heavy_imports(argv, args.checkout, Path(scratch))
            rows.append(dict(command=" ".join(argv), heavy_imports=heavy, **summarise(samples)))
        if args.demo_repeats:
            demo = ["demo", "--out", str(Path(scratch) / "demo")]
            samples = [
                run_timed(demo, args.checkout, Path(scratch)) for _ in range(args.demo_repeats)
            ]
            rows.append(dict(command="demo", heavy_imports=None, **summarise(samples)))
    result = dict(
        checkout=str(args.checkout.resolve()),
        cpu_count=os.cpu_count(),
        load_average=[round(v, 2) for v in os.getloadavg()],
        target=f"--help under {TARGET_SECONDS} s without importing {', '.join(HEAVY)}",
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'command':<18} {'wall median (range) s':>24} {'CPU s':>7}  heavy imports")
    for row in rows:
        low, high = row["wall_range_s"]
        wall = f"{row['wall_median_s']:.2f} ({low:.2f}-{high:.2f})"
        heavy = "-" if row["heavy_imports"] is None else ", ".join(row["heavy_imports"]) or "none"
        print(f"{row['command']:<18} {wall:>24} {row['cpu_median_s']:>7.2f}  {heavy}")
    print(f"load average {result['load_average']} on {result['cpu_count']} CPUs; wrote {args.out}")


if __name__ == "__main__":
    main()
