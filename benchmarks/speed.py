"""Speed and peak memory of class-space saliency, every baseline, Captum and the curves.

For each model and batch size this measures, on the CPU (and on the GPU in fp32 and under
bf16 autocast when CUDA is present):

- ``forward``: a plain ``torch.no_grad()`` forward pass, the reference of every ratio;
- ``class_space`` (last block, target given) and ``class_space_all`` (``layer="all"``);
- every other registered method (``class_space_gradient``, the paper's gradient map, and the
  baselines), under ``torch.no_grad()`` unless it needs gradients;
- ``captum_layergradcam``: Captum's ``LayerGradCam`` used directly on the model, at the
  layer the package's Grad-CAM explains (``blocks[-1].norm1``);

and, per image, the perturbation curves of each protocol preset (chefer2021, rise2018,
vilas2023, road2022), plus vilas2023's two curves redone with pixel deletion at the same
number of steps; and the cost per image of ROAD's noisy linear imputation
(``noisy_linear_impute``) against pytorch-grad-cam's ``NoisyLinearImputer`` (the ROAD
authors' code) at the nine removal fractions of road2022 (``--only-imputer`` measures just
this, on the embedded model's images, and writes ``speed_imputer.{json,md}``). Curves run
for the embedded model on the CPU (ViT-B/16's vilas2023 curves cost ~400 forward passes per
image) and for every model on the GPU.

Timing (``speedkit.timing``): every cell alternates its call with the plain forward of the
same batch (the curves: with the forward of their images; the imputers: with each other)
for at least 5 timed rounds after a warm-up round, and reports the median with the
interquartile range; a ratio is the ratio of medians, with the interquartile range of the
per-round ratios. Each target (``speedkit.targets.TARGETS``, one table) is met, missed or
"within noise" by the rule ``speedkit.targets.RULE``: met only if its whole interval meets
it, missed only if none of it does. Peak memory (``speedkit.memory``) is measured above a
baseline taken after the model is loaded: on the CPU each (model, batch size, measurement)
runs in a fresh process forked from a clean ``forkserver`` process, and its ``ru_maxrss``
grows by that much during its first call (one-time costs, ~10-30 MiB, included); on the
GPU it is ``torch.cuda.max_memory_allocated`` of one call above what was allocated before.

Writes ``benchmarks/results/speed.json`` (``--out``) and a Markdown table next to it
(``speed.md``), and prints the table.

Example:
    python benchmarks/speed.py                # full run: ~35 min on an idle 2-core CPU, no GPU
    python benchmarks/speed.py --quick --out /tmp/quick/speed.json  # smoke run, < 1 min idle
    python benchmarks/speed.py --only-imputer # the imputer row alone (< 1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from speedkit.cells import (
    DTYPES,
    CurveTiming,
    Measurement,
    cpu_measurements,
    curve_timings,
    gpu_measurements,
    imputer_timing,
)
from speedkit.render import environment, imputer_report, render_imputer, render_markdown, to_json
from speedkit.targets import evaluate_targets
from speedkit.timing import Repeats
from speedkit.workloads import MEASUREMENTS, load_workload
from tqdm.auto import tqdm

MODELS = ("default", "vit_base_patch16_224")
"""``default``: the embedded model; any other name: a random-init timm model."""

BATCH_SIZES = (1, 8, 32)
CURVE_IMAGES = 32
"""Images per timed call of the perturbation curves: the benchmark runner's batch size
(token removal runs one forward pass per kept length, so it pays off on many images)."""
CPU_CURVE_MODELS = ("default",)
"""Models whose perturbation curves are timed on the CPU (every model's on the GPU)."""

QUICK = dict(models=["default"], batch_sizes=[1, 2], curve_images=2)
"""The ``--quick`` grid (with exactly 5 timed rounds per cell)."""

PRELOAD = (
    "torch",
    "timm",
    "captum.attr",
    "tqdm.auto",
    "class_space_saliency",
    "class_space_saliency.data",
    "class_space_saliency.evaluation",
    "class_space_saliency.models",
    "speedkit.cells",
    "transformers",
)
"""Modules the forkserver imports once, so that each measurement's process starts in
milliseconds (it still re-runs this script's top level, which then only defines things).
``transformers`` (skipped if absent): building a method imports it to check whether the model
is a Hugging Face one, ~5 s of CPU per process otherwise."""


def _all_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: embedded model, batch sizes 1 and 2, 5 timed rounds per cell, curves "
        "and imputer on 2 images",
    )
    parser.add_argument(
        "--models", nargs="+", help=f"'default' and/or timm model names (default {MODELS})"
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, help=f"default {BATCH_SIZES}")
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed rounds per cell after the warm-up, at least 5 (default: ~3 s worth, 5 to 20)",
    )
    parser.add_argument("--threads", type=int, default=_all_cores(), help="torch CPU threads")
    parser.add_argument(
        "--only-imputer",
        action="store_true",
        help="measure only ROAD's imputer against pytorch-grad-cam's (speed_imputer.json)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON path; the Markdown goes next to it as .md (default "
        "benchmarks/results/speed.json, speed_quick.json with --quick, speed_imputer.json "
        "with --only-imputer)",
    )
    args = parser.parse_args(argv)
    for name, least in (("batch_sizes", 1), ("repeats", 5), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and min(value if isinstance(value, list) else [value]) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    return args


def write(out: Path, report: dict, markdown: str) -> None:
    """Write ``report`` to ``out`` and ``markdown`` next to it (``.md``), and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def measure(
    models: Sequence[str],
    batch_sizes: Sequence[int],
    curve_images: int,
    threads: int,
    repeats: Repeats,
) -> tuple[list[Measurement], list[CurveTiming]]:
    """Every measurement and curve timing of ``models``, on the CPU and on CUDA if present.

    Args:
        models: Model names (see :data:`MODELS`).
        batch_sizes: Batch sizes of the measurements.
        curve_images: Images per curve call.
        threads: Torch CPU threads.
        repeats: Timed rounds per cell.

    Returns:
        ``(measurements, curve timings)``.

    Example:
        >>> rows, curves = measure(["default"], [1], 4, 1, Repeats(fixed=5))
    """
    cuda = torch.cuda.is_available()
    per_model = len(batch_sizes) * len(MEASUREMENTS) * (1 + len(DTYPES) * cuda)
    total = sum(per_model + (m in CPU_CURVE_MODELS) + cuda for m in models)
    measurements: list[Measurement] = []
    curves: list[CurveTiming] = []
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    with tqdm(total=total, desc="speed", unit="cell") as bar, tempfile.TemporaryDirectory() as tmp:
        for model in models:
            work = load_workload(model, max(*batch_sizes, curve_images))
            bundle = Path(tmp) / "workload.pt"
            torch.save(dict(model=work.model, images=work.images, targets=work.targets), bundle)
            measurements += cpu_measurements(
                context, bundle, model, batch_sizes, threads, repeats, bar
            )
            if model in CPU_CURVE_MODELS:
                curves += curve_timings(work, model, curve_images, repeats, bar)
            if cuda:
                on_gpu = work.to("cuda")
                measurements += gpu_measurements(on_gpu, model, batch_sizes, repeats, bar)
                curves += curve_timings(on_gpu, model, curve_images, repeats, bar)
    return measurements, curves


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark, write JSON and Markdown, print the tables.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Example:
        >>> main(["--quick", "--threads", "1", "--out", "/tmp/quick/speed.json"])
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = dict(models=list(MODELS), batch_sizes=list(BATCH_SIZES), curve_images=CURVE_IMAGES)
    if args.quick:
        grid.update(QUICK)
    grid.update({k: v for k, v in vars(args).items() if k in grid and v is not None})
    repeats = Repeats(5 if args.quick and args.repeats is None else args.repeats)
    if args.only_imputer:
        work = load_workload("default", grid["curve_images"])
        imputer = imputer_report(imputer_timing(work, grid["curve_images"], repeats))
        out = args.out or Path("benchmarks/results/speed_imputer.json")
        write(out, dict(environment(args.threads), imputer=imputer), render_imputer(imputer))
        return
    out = args.out or Path(f"benchmarks/results/speed{'_quick' if args.quick else ''}.json")
    started = time.perf_counter()
    measurements, curves = measure(**grid, threads=args.threads, repeats=repeats)
    imputer = imputer_timing(
        load_workload("default", grid["curve_images"]), grid["curve_images"], repeats
    )
    meta = dict(
        environment(args.threads),
        **grid,
        repeats=dataclasses.asdict(repeats),
        quick=args.quick,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        duration_s=time.perf_counter() - started,
    )
    report = to_json(meta, measurements, curves, evaluate_targets(measurements, curves))
    report["imputer"] = imputer_report(imputer)
    write(out, report, render_markdown(report) + "\n" + render_imputer(report["imputer"]))


if __name__ == "__main__":
    main()
