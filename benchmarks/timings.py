"""What a new user waits for: the wall and CPU time of the commands the docs quote.

Each command runs in a fresh process (as a user runs it) from an empty working folder:
``--help``, ``demo`` on the default embedded model, ``analyze`` on the first 100 evaluation
images, ``benchmark`` (default methods and protocols) on the first 10, ``attribute`` on one
photo. Wall time, CPU time of the process and its children, and the machine (CPU model, cores,
torch threads, load average before the run) go to ``benchmarks/results/timings.json``;
``benchmarks/readme_tables.py`` writes the docs' timing table from it.

Example:
    python benchmarks/timings.py          # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "help": ["--help"],
    "demo": ["demo", "--out", "demo_out"],
    "analyze (100 images)": ["analyze", "--num-images", "100", "--out", "analysis_out"],
    "benchmark (10 images)": ["benchmark", "--num-images", "10", "--out", "benchmark_out"],
    "attribute (1 photo)": ["attribute", "photo.png", "--methods", "class_space", "chefer"],
}
"""Command name -> arguments of ``python -m class_space_saliency``."""


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(arguments: list[str], folder: Path) -> dict:
    """Run ``python -m class_space_saliency ARGUMENTS`` in ``folder``; its wall and CPU time."""
    cpu, start = children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "class_space_saliency", *arguments],
        cwd=folder,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{arguments} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {
        "arguments": arguments,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(children_cpu_seconds() - cpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    import torch
    from PIL import Image
    from skimage import data as photos
    from speedkit.render import environment

    machine = environment(torch.get_num_threads())
    results = {
        "machine": {**machine, "load_average_before": round(os.getloadavg()[0], 2)},
        "commands": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        Image.fromarray(photos.chelsea()).save(folder / "photo.png")
        for name, arguments in COMMANDS.items():
            results["commands"][name] = timed(arguments, folder)
            row = results["commands"][name]
            print(
                f"{name:<24} wall {row['wall_seconds']:>7.2f} s  cpu {row['cpu_seconds']:>7.2f} s"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timings.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
