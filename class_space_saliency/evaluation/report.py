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
from .localisation import METRICS
from .protocols import PerturbationProtocol, protocol_to_dict
from .store import LOCALISATION, load_config, load_records

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
        sections: Every table of the report, in order (see :class:`Section`).
        missing: ``(section, method)`` pairs without any record.
        files: Files written by :func:`write_report`.
    """

    config: dict
    clean_accuracy: float
    n_images: int
    rows: list[MethodRow]
    curves: dict[str, dict[str, tuple[list[float], list[float]]]]
    skipped: list[dict]
    sections: list[Section] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """The central 95 % percentile interval of bootstrap samples."""
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


@dataclass(frozen=True)
class Section:
    """One table of the report: a curve of the config or a quantity derived from records.

    Attributes:
        name: ``"chefer2021/positive"``, ``"road2022/combined"``,
            ``"localisation/pointing_game"`` ...
        higher_is_better: Direction of the summary value.
        rule: AUC rule applied to the mean curve (``"mean"`` for derived per-image values).
        protocol: The config's protocol for curve sections, ``None`` for derived ones.
        description: What a derived section shows (``""`` for curve sections).
    """

    name: str
    higher_is_better: bool
    rule: str
    protocol: PerturbationProtocol | None = None
    description: str = ""


ROAD_COMBINED = {"road2022/combined": ("road2022/lerf", "road2022/morf")}
"""Derived section -> (LeRF curve, MoRF curve): per image (LeRF - MoRF) / 2 (Rong et al.)."""


def _protocol_rows(
    section: Section,
    curves: dict[str, np.ndarray],
    x: list[float],
    reference: str,
    n_boot: int,
    seed: int,
) -> list[MethodRow]:
    """Rows of one section from aligned per-image curves ``{method: (n, S)}``."""
    n = next(iter(curves.values())).shape[0]
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n

    def boot_auc(matrix: np.ndarray) -> np.ndarray:
        return area_under_curve(weights @ matrix, x, section.rule)

    aucs = {m: float(area_under_curve(c.mean(0), x, section.rule)) for m, c in curves.items()}
    per_image = {m: area_under_curve(c, x, section.rule) for m, c in curves.items()}
    ref_boot = boot_auc(curves[reference]) if reference in curves else None
    rows = []
    for method, matrix in curves.items():
        boot = boot_auc(matrix)
        row = MethodRow(section.name, method, n, aucs[method], *_interval(boot))
        if ref_boot is not None and method != reference:
            ours, theirs = per_image[reference], per_image[method]
            better = ours > theirs if section.higher_is_better else ours < theirs
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


def _per_image_values(
    results: Sequence[dict], protocols: Sequence[PerturbationProtocol], localised: bool
) -> tuple[list[Section], dict[str, dict[tuple[str, int], list[float]]]]:
    """Sections and their per-image curves ``{section: {(method, image): curve}}``."""
    found: dict[str, dict[tuple[str, int], list[float]]] = {}
    for r in results:
        key = (r["method"], r["image"])
        if r["protocol"] == LOCALISATION:
            for metric, value in r["localisation"].items():
                found.setdefault(f"{LOCALISATION}/{metric}", {})[key] = [value]
        else:
            found.setdefault(r["protocol"], {})[key] = r["curve"]
    sections = [Section(p.name, p.higher_is_better, p.auc, p) for p in protocols]
    names = {p.name for p in protocols}
    for name, (lerf, morf) in ROAD_COMBINED.items():
        if lerf in names and morf in names:
            both = found.get(lerf, {}).keys() & found.get(morf, {}).keys()
            found[name] = {
                key: ((np.array(found[lerf][key]) - np.array(found[morf][key])) / 2).tolist()
                for key in both
            }
            after = max(i for i, sec in enumerate(sections) if sec.name in (lerf, morf))
            combined = Section(name, True, "mean", None, "(LeRF - MoRF) / 2 per image")
            sections.insert(after + 1, combined)
    if localised:
        sections += [
            Section(f"{LOCALISATION}/{metric}", True, "mean", None, LOCALISATION_TEXT[metric])
            for metric in METRICS
        ]
    return sections, found


LOCALISATION_TEXT = {
    "pointing_game": "share of images whose map maximum lies in the mask",
    "relevance_mass": "positive relevance inside the mask / all positive relevance",
    "relevance_rank": "share of the K highest pixels inside the mask, K = mask area",
    "mask_auroc": "ROC AUC of the map separating mask from background pixels",
}


def summarize(
    records: Sequence[dict],
    config: dict,
    *,
    reference: str = REFERENCE,
    n_boot: int = 1000,
    seed: int = 0,
) -> BenchmarkReport:
    """Summarise benchmark records.

    Every protocol of the config gets a section, and so do the derived quantities:
    ``road2022/combined`` where both ROAD curves ran and ``localisation/<metric>`` for a
    dataset with masks. A method without any record for a section is listed in
    ``missing`` (the others are compared on the images they share).

    Args:
        records: Records of :func:`~class_space_saliency.evaluation.store.load_records`.
        config: The run's config (supplies the protocols and the method order).
        reference: Method every other method is compared with.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        The report (no files written).

    Example:
        >>> from class_space_saliency.evaluation import run_benchmark
        >>> _ = run_benchmark(model, (images, labels), ["sobel"], ["chefer2021/positive"],
        ...     mean=(0.5,) * 3, std=(0.5,) * 3, out_dir="runs/a", progress=False)
        >>> report = summarize(load_records("runs/a"), load_config("runs/a"))
        >>> report.n_images, [row.method for row in report.rows]
        (3, ['sobel'])
    """
    protocols = [PerturbationProtocol(**knobs) for knobs in config["protocols"]]
    methods = [m["name"] for m in config["methods"]]
    results = [r for r in records if r.get("method") is not None]
    images = {r["image"]: r for r in results}
    correct = [r["prediction"] == r["label"] for r in images.values()]
    localised = bool(config.get("dataset", {}).get("masks")) or any(
        r["protocol"] == LOCALISATION for r in results
    )
    sections, found = _per_image_values(results, protocols, localised)
    rows, mean_curves, missing = [], {}, []
    for section in sections:
        values = found.get(section.name, {})
        by_method = {m: {i: c for (method, i), c in values.items() if method == m} for m in methods}
        missing += [(section.name, m) for m, curves in by_method.items() if not curves]
        present = {m: curves for m, curves in by_method.items() if curves}
        if not present:
            continue
        common = sorted(set.intersection(*(set(curves) for curves in present.values())))
        if not common:
            missing += [(section.name, m) for m in present]
            continue
        curves = {
            m: np.array([image_curves[i] for i in common], dtype=np.float64)
            for m, image_curves in present.items()
        }
        width = next(iter(curves.values())).shape[1]
        x = curve_x(section.protocol, width) if section.protocol else [1.0] * width
        rows += _protocol_rows(section, curves, x, reference, n_boot, seed)
        if section.protocol is not None:
            mean_curves[section.name] = {m: (x, c.mean(0).tolist()) for m, c in curves.items()}
    return BenchmarkReport(
        config=config,
        clean_accuracy=float(np.mean(correct)) if correct else float("nan"),
        n_images=len(images),
        rows=rows,
        curves=mean_curves,
        skipped=[r for r in records if r.get("method") is None],
        sections=sections,
        missing=missing,
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
    sections = report.sections
    for position, section in enumerate(sections):
        direction = "higher" if section.higher_is_better else "lower"
        lines += [f"## {section.name} ({direction} is better)", ""]
        protocol = section.protocol
        if protocol is not None:
            knobs = protocol_to_dict(protocol)
            blur = {"blur_kernel_size", "blur_sigma"} if protocol.baseline != "blur" else set()
            noise = {"impute_noise"} if protocol.baseline != "impute" else set()
            extra = {"extra_scores"} if not protocol.extra_scores else set()
            hidden = {"name", "steps", *blur, *noise, *extra}
            shown = {k: v for k, v in knobs.items() if k not in hidden}
            steps = "every count 1 … N-1" if protocol.steps is None else list(protocol.steps)
            lines += [
                "Knobs: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + f", steps={steps}",
                "",
            ]
        else:
            lines += [f"{section.description}; mean over images.", ""]
        value = "AUC" if protocol is not None else "mean"
        lines += [
            f"| method | images | {value} | 95 % CI | {reference} − method | 95 % CI "
            f"| {reference} better |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in report.rows if r.protocol == section.name):
            share = (
                "" if row.share_reference_better is None else f"{row.share_reference_better:.1%}"
            )
            diff_ci = "" if row.diff is None else f"[{_fmt(row.diff_low)}, {_fmt(row.diff_high)}]"
            lines.append(
                f"| {row.method} | {row.n_images} | {_fmt(row.auc)} "
                f"| [{_fmt(row.auc_low)}, {_fmt(row.auc_high)}] | {_fmt(row.diff)} | {diff_ci} "
                f"| {share} |"
            )
        lines += [
            f"| {method} | 0 | missing (no records) | | | | |"
            for name, method in report.missing
            if name == section.name
        ]
        lines.append("")
        preset = section.name.split("/")[0]
        following = (
            sections[position + 1].name.split("/")[0] if position + 1 < len(sections) else None
        )
        if following != preset and any(name.startswith(f"{preset}/") for name in report.curves):
            lines += [f"![{preset}](curves_{preset}.png)", ""]
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

    protocols = [PerturbationProtocol(**knobs) for knobs in report.config["protocols"]]
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

    Raises:
        ValueError: If the folder holds no result records (nothing is overwritten).

    Example:
        >>> from class_space_saliency.evaluation import run_benchmark
        >>> _ = run_benchmark(model, (images, labels), ["sobel"], ["chefer2021/positive"],
        ...     mean=(0.5,) * 3, std=(0.5,) * 3, out_dir="runs/a", progress=False)
        >>> write_report("runs/a").clean_accuracy  # labels: the model's own predictions
        1.0
    """
    out_dir = Path(out_dir)
    config = load_config(out_dir)
    seed = config["seed"] if seed is None else seed
    records = load_records(out_dir)
    if not any(r.get("method") is not None for r in records):
        raise ValueError(
            f"{out_dir} holds no result records (results.rank*.jsonl or .jsonl.gz); "
            "the report was not written"
        )
    report = summarize(records, config, reference=reference, n_boot=n_boot, seed=seed)
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
