"""The report: a JSON-ready dict of every measurement, and its Markdown tables."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import captum
import timm
import torch

from .cells import CurveTiming, Measurement
from .targets import RULE
from .timing import Spread, paired_ratio, summary
from .workloads import MEASUREMENTS

MEASURED = (
    "Times: median [interquartile range] of the timed rounds after a warm-up round; every "
    "cell alternates its call with the plain no_grad forward of the same model, device, dtype "
    "and batch (the curves: of the same images) in at least 5 rounds, and (Nx) is the ratio "
    "of the two medians, with the interquartile range of the per-round ratios. Peak memory "
    "above the post-load baseline: CPU, ru_maxrss of a fresh process per cell over its first "
    "call (one-time costs of ~10-30 MiB included); GPU, torch.cuda.max_memory_allocated."
)
"""How the figures are measured, as the report states it."""


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict:
    """Library versions, CPU, torch threads and GPU of this run."""
    return dict(
        torch=torch.__version__,
        timm=timm.__version__,
        captum=captum.__version__,
        python=platform.python_version(),
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        torch_threads=threads,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )


def _ends(spread: Spread | None) -> dict | None:
    return None if spread is None else dataclasses.asdict(spread)


def imputer_report(row: dict) -> dict:
    """:func:`~.cells.imputer_timing`'s rounds with their medians and the paired ratio."""
    ours, reference = row["ours_s"], row["reference_s"]
    return dict(
        row,
        ours=_ends(summary(ours)),
        reference=_ends(summary(reference)),
        ratio=_ends(paired_ratio(ours, reference)),
    )


def to_json(
    meta: dict,
    measurements: Sequence[Measurement],
    curves: Sequence[CurveTiming],
    targets: Sequence[dict],
) -> dict:
    """Everything as a JSON-ready dict, with medians and ratios to the forward.

    Args:
        meta: Environment and options of the run.
        measurements: All measurements.
        curves: All curve timings.
        targets: Rows of :func:`~.targets.evaluate_targets`.

    Returns:
        ``{meta, measured, rule, measurements, curves, targets}``; ``time`` and
        ``time_ratio`` are ``{value, low, high}``.

    Example:
        >>> Path("speed.json").write_text(json.dumps(to_json(meta, rows, curves, targets)))
    """
    forward = {m.group: m for m in measurements if m.name == "forward"}

    def memory_ratio(m: Measurement) -> float | None:
        below = forward[m.group].peak_bytes
        return m.peak_bytes / below if below > 0 else None

    rows = [
        dict(
            dataclasses.asdict(m),
            time=_ends(summary(m.times_s)),
            time_ratio=_ends(paired_ratio(m.times_s, m.forward_s)),
            memory_ratio=memory_ratio(m),
        )
        for m in measurements
    ]
    curve_rows = [
        dict(
            dataclasses.asdict(c),
            per_image=_ends(summary(c.times_s).scaled(1 / c.images)),
            forward_ratio=_ends(paired_ratio(c.times_s, c.forward_s)),
        )
        for c in curves
    ]
    return dict(
        meta=meta,
        measured=MEASURED,
        rule=RULE,
        measurements=rows,
        curves=curve_rows,
        targets=list(targets),
    )


def _cells(values: Sequence[str]) -> str:
    return "| " + " | ".join(values) + " |"


def _seconds(spread: dict) -> str:
    scale, unit, digits = (1e3, "ms", 1) if spread["value"] < 1 else (1, "s", 2)
    low, value, high = (f"{spread[k] * scale:.{digits}f}" for k in ("low", "value", "high"))
    return f"{value} {unit} [{low}, {high}]"


def _figure(spread: dict | None, unit: str = "x", digits: int = 2) -> str:
    if spread is None or spread["value"] is None:
        return "n/a"
    value, low, high = (f"{spread[k]:.{digits}f}" for k in ("value", "low", "high"))
    return f"{value}{unit}" if low == high == value else f"{value}{unit} [{low}, {high}]"


def _measurement_tables(rows: Sequence[dict]) -> list[str]:
    lines = []
    for config in dict.fromkeys((r["model"], r["device"], r["dtype"]) for r in rows):
        cell = {(r["batch_size"], r["name"]): r for r in rows
                if (r["model"], r["device"], r["dtype"]) == config}  # fmt: skip
        batches = sorted({batch for batch, _ in cell})
        bf16 = config[2] == "bf16"
        header = ["measurement"]
        for b in batches:
            header += [f"b={b} time", f"b={b} / forward", f"b={b} peak"] + [f"b={b} ρ min"] * bf16
        lines += [f"## {', '.join(config)}", "", _cells(header)]
        lines.append(_cells(["---"] + ["---:"] * (len(header) - 1)))
        for name in MEASUREMENTS:
            values = [name]
            for batch in batches:
                r = cell[(batch, name)]
                memory = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
                values += [_seconds(r["time"]), _figure(r["time_ratio"])]
                values.append(f"{r['peak_bytes'] / 2**20:.1f} MiB ({memory})")
                if bf16:
                    least = r["spearman_vs_fp32"]["min"]
                    values.append("n/a" if least is None else f"{least:.4f}")
            lines.append(_cells(values))
        lines.append("")
    return lines


def render_markdown(report: dict) -> str:
    """The Markdown tables of a :func:`to_json` report.

    One table per (model, device, dtype) with time, ratio to the forward and peak memory
    per batch size (and, under bf16, the least per-image Spearman correlation with fp32),
    then the curves per image, and the targets with the rule that judged them.

    Args:
        report: What :func:`to_json` returns.

    Returns:
        The Markdown text.

    Example:
        >>> print(render_markdown(json.loads(Path("speed.json").read_text())))
    """
    meta = report["meta"]
    lines = [
        "# Speed and peak memory",
        "",
        f"torch {meta['torch']}, timm {meta['timm']}, captum {meta['captum']}, Python "
        f"{meta['python']}; CPU: {meta['cpu']} ({meta['torch_threads']} torch threads of "
        f"{meta['cpu_count']} cores); GPU: {meta['gpu'] or 'none'}; "
        f"{meta['duration_s'] / 60:.1f} min.",
        "",
        report["measured"],
        "",
        *_measurement_tables(report["measurements"]),
    ]
    if report["curves"]:
        lines += [
            "## Perturbation curves per image",
            "",
            "(Nx) = forward passes' worth: the plain forward of the same images, alternated "
            "with the curves in the same rounds.",
            "",
            _cells(["model", "device", "curves", "images", "inputs/image", "time/image", "Nx"]),
            _cells(["---"] * 3 + ["---:"] * 4),
        ]
        for c in report["curves"]:
            numbers = [str(c["images"]), str(c["forwards_per_image"]), _seconds(c["per_image"])]
            lines.append(_cells([c["model"], c["device"], c["name"], *numbers,
                                 _figure(c["forward_ratio"])]))  # fmt: skip
        lines.append("")
    lines += ["## Targets", "", report["rule"], "", render_targets(report)]
    return "\n".join(lines)


def render_targets(report: dict) -> str:
    """The targets of a :func:`to_json` report as a Markdown table, verdicts included."""
    lines = [
        _cells(["target", "model", "device", "dtype", "batch", "value", "threshold", "verdict"]),
        _cells(["---"] * 4 + ["---:"] * 2 + ["---"] * 2),
    ]
    for t in report["targets"]:
        digits = 4 if t["unit"] == "" else 2
        verdict = t["verdict"] if t["verdict"] != "missed" else "**missed**"
        config = [t["model"], t["device"], t["dtype"], str(t["batch_size"])]
        value = _figure(t, t["unit"], digits)
        lines.append(_cells([t["target"], *config, value, t["threshold"], verdict]))
    return "\n".join(lines) + "\n"


SELECTED = (
    "class_space",
    "class_space_all",
    "class_space_gradient",
    "class_space_contributions",
    "gradcam",
    "captum_layergradcam",
    "rollout",
    "chefer",
)
"""The measurements of :func:`render_selected`, after the forward."""


def render_selected(report: dict, quantity: str) -> str:
    """Time or peak memory of the :data:`SELECTED` measurements as ratios to the forward.

    Args:
        report: What :func:`to_json` returns.
        quantity: ``"time"`` (ratio of medians [interquartile range of per-round ratios]) or
            ``"memory"`` (ratio of peaks); the forward's row gives its own median time or
            peak memory.

    Returns:
        A Markdown table: one row per measurement, one column per fp32 (model, device,
        batch) cell of the report.

    Raises:
        ValueError: For another ``quantity``.
    """
    if quantity not in ("time", "memory"):
        raise ValueError(f"quantity must be 'time' or 'memory', not {quantity!r}")
    rows = [r for r in report["measurements"] if r["dtype"] == "fp32"]
    columns = list(dict.fromkeys((r["model"], r["device"], r["batch_size"]) for r in rows))
    cell = {(r["model"], r["device"], r["batch_size"], r["name"]): r for r in rows}
    devices = {device for _, device, _ in columns}
    header = [
        f"{model}{f' {device}' if len(devices) > 1 else ''} b={batch}"
        for model, device, batch in columns
    ]
    lines = [_cells(["", *header]), _cells(["---"] + ["---:"] * len(columns))]
    for name in ("forward", *SELECTED):
        values = [f"`{name}`" if name != "forward" else "forward"]
        for column in columns:
            r = cell.get((*column, name))
            if r is None:
                values.append("")
            elif quantity == "memory":
                ratio = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
                values.append(f"{r['peak_bytes'] / 2**20:.0f} MiB" if name == "forward" else ratio)
            else:
                forward = _seconds(r["time"]).split(" [")[0]
                values.append(forward if name == "forward" else _figure(r["time_ratio"]))
        lines.append(_cells(values))
    return "\n".join(lines) + "\n"


def render_imputer(report: dict) -> str:
    """A Markdown table of :func:`imputer_report`'s result."""
    size = "x".join(str(v) for v in report["image_size"])
    return "\n".join(
        [
            f"ROAD noisy linear imputation, per image and mask ({report['masks']} masks, "
            f"{size}; median [interquartile range] of rounds alternating the two):",
            "",
            "| imputer | time | ratio |",
            "|---|---:|---:|",
            _cells(["`noisy_linear_impute`", _seconds(report["ours"]), _figure(report["ratio"])]),
            _cells(["pytorch-grad-cam `NoisyLinearImputer`", _seconds(report["reference"]), "1x"]),
            "",
        ]
    )
