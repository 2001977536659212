"""Benchmark summary: AUCs with bootstrap intervals, paired comparisons, tables and plots.

The AUC of a method under a protocol is the protocol's AUC rule applied to the mean curve
over images (for the trapezoid rules this equals the mean of per-image AUCs). Intervals
resample images with replacement (seeded); comparisons with the reference method
(``"class_space"``) resample the same images for both methods.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .curves import area_under_curve, curve_x
from .protocols import Protocol, protocol_to_dict
from .store import load_config, load_records

REFERENCE = "class_space"


@dataclass(frozen=True)
class MethodRow:
    """One method under one protocol.

    Attributes:
        protocol: Curve name, e.g. ``"chefer2021/positive"``.
        method: Method name.
        n_images: Images with a curve of every method under this protocol.
        auc: AUC of the mean curve.
        auc_low: Lower end of the bootstrap interval.
        auc_high: Upper end of the bootstrap interval.
        diff: ``AUC(reference) - AUC(method)``; ``None`` for the reference or without it.
        diff_low: Lower end of the paired bootstrap interval of ``diff``.
        diff_high: Upper end of the paired bootstrap interval of ``diff``.
        share_reference_better: Share of images whose per-image AUC is strictly better
            (in the protocol's direction) for the reference than for this method; the
            per-image AUC is the rule applied to the image's own curve.
    """

    protocol: str
    method: str
    n_images: int
    auc: float
    auc_low: float
    auc_high: float
    diff: float | None = None
    diff_low: float | None = None
    diff_high: float | None = None
    share_reference_better: float | None = None


@dataclass
class BenchmarkReport:
    """Everything the report files show.

    Attributes:
        config: The run's config (model, methods, protocols and their knobs, n, seed).
        clean_accuracy: Top-1 accuracy of the model on the evaluated, unperturbed images.
        n_images: Images evaluated.
        rows: One :class:`MethodRow` per protocol x method.
        curves: ``{protocol: {method: (x, mean curve)}}``.
        skipped: Skip records of unreadable images (``image``, ``skipped`` path, ``reason``).
        files: Files written by :func:`write_report`.
    """

    config: dict
    clean_accuracy: float
    n_images: int
    rows: list[MethodRow]
    curves: dict[str, dict[str, tuple[list[float], list[float]]]]
    skipped: list[dict]
    files: list[Path] = field(default_factory=list)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """The central 95 % percentile interval of bootstrap samples."""
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def _protocol_rows(
    protocol: Protocol,
    curves: dict[str, np.ndarray],
    x: list[float],
    reference: str,
    n_boot: int,
    seed: int,
) -> list[MethodRow]:
    """Rows of one protocol from aligned per-image curves ``{method: (n, S)}``."""
    n = next(iter(curves.values())).shape[0]
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n

    def boot_auc(matrix: np.ndarray) -> np.ndarray:
        return area_under_curve(weights @ matrix, x, protocol.auc)

    aucs = {m: float(area_under_curve(c.mean(0), x, protocol.auc)) for m, c in curves.items()}
    per_image = {m: area_under_curve(c, x, protocol.auc) for m, c in curves.items()}
    ref_boot = boot_auc(curves[reference]) if reference in curves else None
    rows = []
    for method, matrix in curves.items():
        boot = boot_auc(matrix)
        row = MethodRow(protocol.name, method, n, aucs[method], *_interval(boot))
        if ref_boot is not None and method != reference:
            ours, theirs = per_image[reference], per_image[method]
            better = ours > theirs if protocol.higher_is_better else ours < theirs
            diff = aucs[reference] - aucs[method]
            low, high = _interval(ref_boot - boot)
            row = dataclasses.replace(
                row,
                diff=diff,
                diff_low=low,
                diff_high=high,
                share_reference_better=float(better.mean()),
            )
        rows.append(row)
    return rows


def summarize(
    records: Sequence[dict],
    config: dict,
    *,
    reference: str = REFERENCE,
    n_boot: int = 1000,
    seed: int = 0,
) -> BenchmarkReport:
    """Summarise benchmark records.

    Args:
        records: Records of :func:`~class_space_saliency.evaluation.store.load_records`.
        config: The run's config (supplies the protocols and the method order).
        reference: Method every other method is compared with.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        The report (no files written).

    Example:
        >>> report = summarize(load_records("runs/a"), load_config("runs/a"))
    """
    protocols = [Protocol(**knobs) for knobs in config["protocols"]]
    methods = [m["name"] for m in config["methods"]]
    results = [r for r in records if r.get("method") is not None]
    images = {r["image"]: r for r in results}
    correct = [r["prediction"] == r["label"] for r in images.values()]
    found: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in results:
        found.setdefault((r["protocol"], r["method"]), {})[r["image"]] = r["curve"]
    rows, mean_curves = [], {}
    for protocol in protocols:
        by_method = {m: found.get((protocol.name, m), {}) for m in methods}
        common = sorted(set.intersection(*(set(images) for images in by_method.values())))
        if not common:
            continue
        curves = {
            m: np.array([image_curves[i] for i in common], dtype=np.float64)
            for m, image_curves in by_method.items()
        }
        x = curve_x(protocol, next(iter(curves.values())).shape[1])
        rows += _protocol_rows(protocol, curves, x, reference, n_boot, seed)
        mean_curves[protocol.name] = {m: (x, c.mean(0).tolist()) for m, c in curves.items()}
    return BenchmarkReport(
        config=config,
        clean_accuracy=float(np.mean(correct)) if correct else float("nan"),
        n_images=len(images),
        rows=rows,
        curves=mean_curves,
        skipped=[r for r in records if r.get("method") is None],
    )


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _markdown(report: BenchmarkReport, reference: str) -> str:
    config = report.config
    lines = [
        "# Faithfulness benchmark",
        "",
        f"- model: {config['model']['name']} (fingerprint {config['model']['fingerprint']})",
        f"- images: {report.n_images} evaluated of {config['n']} requested, "
        f"{len(report.skipped)} unreadable",
        f"- clean accuracy: {report.clean_accuracy:.4f}",
        f"- seed: {config['seed']}; intervals: 95 % bootstrap over images",
        "",
    ]
    protocols = [Protocol(**knobs) for knobs in config["protocols"]]
    for position, protocol in enumerate(protocols):
        knobs = protocol_to_dict(protocol)
        direction = "higher" if protocol.higher_is_better else "lower"
        blur = {"blur_kernel_size", "blur_sigma"} if protocol.baseline != "blur" else set()
        hidden = {"name", "steps", *blur}
        shown = {k: v for k, v in knobs.items() if k not in hidden}
        steps = "every count 1 … N-1" if protocol.steps is None else list(protocol.steps)
        lines += [
            f"## {protocol.name} ({direction} is better)",
            "",
            "Knobs: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + f", steps={steps}",
            "",
            f"| method | images | AUC | 95 % CI | {reference} − method | 95 % CI "
            f"| {reference} better |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in report.rows if r.protocol == protocol.name):
            share = (
                "" if row.share_reference_better is None else f"{row.share_reference_better:.1%}"
            )
            diff_ci = "" if row.diff is None else f"[{_fmt(row.diff_low)}, {_fmt(row.diff_high)}]"
            lines.append(
                f"| {row.method} | {row.n_images} | {_fmt(row.auc)} "
                f"| [{_fmt(row.auc_low)}, {_fmt(row.auc_high)}] | {_fmt(row.diff)} | {diff_ci} "
                f"| {share} |"
            )
        lines.append("")
        last_of_preset = (
            position + 1 == len(protocols) or protocols[position + 1].preset != protocol.preset
        )
        if last_of_preset and protocol.name in report.curves:
            lines += [f"![{protocol.preset}](curves_{protocol.preset}.png)", ""]
    if report.skipped:
        lines += ["## Unreadable images (skipped)", ""]
        lines += [f"- #{s['image']} `{s['skipped']}`: {s['reason']}" for s in report.skipped]
        lines.append("")
    return "\n".join(lines)


def _plot(report: BenchmarkReport, out_dir: Path) -> list[Path]:
    """One PNG per preset: the mean curve of every method, one panel per curve.

    Figures are drawn on Agg canvases directly, leaving pyplot's global backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    protocols = [Protocol(**knobs) for knobs in report.config["protocols"]]
    presets = dict.fromkeys(p.preset for p in protocols if p.name in report.curves)
    files = []
    for preset in presets:
        panels = [p for p in protocols if p.preset == preset and p.name in report.curves]
        figure = Figure(figsize=(5 * len(panels), 4))
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(panels), squeeze=False)
        for axis, protocol in zip(axes[0], panels, strict=True):
            for method, (x, curve) in report.curves[protocol.name].items():
                axis.plot(x, curve, label=method)
            direction = "higher" if protocol.higher_is_better else "lower"
            axis.set_title(f"{protocol.name} ({direction} AUC is better)")
            done = "inserted" if protocol.mode == "insertion" else "deleted"
            axis.set_xlabel(f"fraction of {protocol.unit}s {done} ({protocol.order} order)")
            axis.set_ylabel(f"{protocol.score} ({protocol.score_class})")
            axis.legend(fontsize="small")
        figure.tight_layout()
        path = out_dir / f"curves_{preset}.png"
        figure.savefig(path, dpi=100)
        files.append(path)
    return files


def write_report(
    out_dir: str | Path,
    *,
    reference: str = REFERENCE,
    n_boot: int = 1000,
    seed: int | None = None,
) -> BenchmarkReport:
    """Summarise a run folder into ``report.md``, ``report.csv`` and ``curves_<preset>.png``.

    Args:
        out_dir: The folder ``run_benchmark`` wrote to (all rank shards are merged).
        reference: Method every other method is compared with.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed; default: the run's seed.

    Returns:
        The report, with the written paths in ``files``.

    Example:
        >>> write_report("runs/a").clean_accuracy
    """
    out_dir = Path(out_dir)
    config = load_config(out_dir)
    seed = config["seed"] if seed is None else seed
    report = summarize(load_records(out_dir), config, reference=reference, n_boot=n_boot, seed=seed)
    markdown = out_dir / "report.md"
    markdown.write_text(_markdown(report, reference))
    table = out_dir / "report.csv"
    with open(table, "w", newline="") as handle:
        names = [f.name for f in dataclasses.fields(MethodRow)]
        writer = csv.DictWriter(handle, fieldnames=[*names, "clean_accuracy"])
        writer.writeheader()
        for row in report.rows:
            writer.writerow({**dataclasses.asdict(row), "clean_accuracy": report.clean_accuracy})
    report.files = [markdown, table, *_plot(report, out_dir)]
    return report
