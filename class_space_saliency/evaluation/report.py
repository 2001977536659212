"""Benchmark summary: AUCs with bootstrap intervals, paired comparisons, verdicts, plots.

The AUC of a method under a protocol is the protocol's AUC rule applied to the mean curve
over images (for the trapezoid rules this equals the mean of per-image AUCs). Intervals
resample images with replacement (seeded, :func:`~class_space_saliency._stats.bootstrap_weights`);
comparisons with the reference method (``"class_space"``) resample the same images for both
methods.

**Verdicts.** A method is ``"better"`` or ``"worse"`` than the reference (in the direction of
the curve) only where the paired 95 % interval of the AUC difference excludes zero, else
``"tie"``. A verdict is *fragile* where it rests on the bootstrap's luck: a better/worse
verdict whose interval ends within :data:`FRAGILE_MARGIN` of the AUC scale of zero, or any
verdict that changes when the bootstrap is redrawn with the seed ``seed + 1``. Fragile
verdicts are shown in parentheses and not counted as better, tie or worse. Derived sections
(``road2022/combined``, which restates the two ROAD curves) are shown but not counted either.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._stats import bootstrap_weights, percentile_interval
from .curves import area_under_curve, curve_x
from .localisation import METRICS
from .protocols import SHARED_RANDOM, PerturbationProtocol, protocol_to_dict
from .store import LOCALISATION, load_config, load_records

REFERENCE = "class_space"
FRAGILE_MARGIN = 0.002
"""A better/worse verdict is fragile where its interval ends closer to zero than this share
of the AUC scale: 0.002 for AUCs and localisation scores in [0, 1], 0.2 for the percent AUCs
of ``chefer2021`` (``trapezoid_percent``)."""
VERDICTS = ("better", "tie", "worse")
SUBSETS = ("all", "correct")
"""Images a summary reads: all, or only those the model classified correctly (clean)."""


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
        verdict: This method against the reference: ``"better"``, ``"tie"`` or
            ``"worse"`` (see the module docstring); ``None`` for the reference.
        fragile: Whether the verdict is fragile (``None`` for the reference).
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
    verdict: str | None = None
    fragile: bool | None = None

    def gain(self, higher_is_better: bool) -> tuple[float, float, float] | None:
        """How much better this method is than the reference, with its interval.

        ``AUC(method) - AUC(reference)`` on higher-is-better curves, the reverse on
        lower-is-better ones, so that a positive gain means the method is better on every
        curve. ``None`` for the reference.
        """
        if self.diff is None:
            return None
        if higher_is_better:
            return -self.diff, -self.diff_high, -self.diff_low
        return self.diff, self.diff_low, self.diff_high


@dataclass
class BenchmarkReport:
    """Everything the report files show.

    Attributes:
        config: The run's config (model, methods, protocols and their knobs, n, seed).
        clean_accuracy: Top-1 accuracy of the model on the evaluated, unperturbed images.
        n_images: Images summarised (all evaluated ones, or the correct ones: ``subset``).
        rows: One :class:`MethodRow` per protocol x method.
        curves: ``{protocol: {method: (x, mean curve)}}``.
        skipped: Skip records of unreadable images (``image``, ``skipped`` path, ``reason``).
        sections: Every table of the report, in order (see :class:`Section`).
        missing: ``(section, method)`` pairs without any record.
        files: Files written by :func:`write_report`.
        subset: ``"all"`` evaluated images or only the ``"correct"`` ones (see
            :data:`SUBSETS`).
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
    subset: str = "all"


@dataclass(frozen=True)
class Section:
    """One table of the report: a curve of the config or a quantity derived from records.

    Attributes:
        name: ``"chefer2021/positive"``, ``"road2022/combined"``,
            ``"localisation/pointing_game"`` ...
        higher_is_better: Direction of the summary value.
        rule: AUC rule applied to the mean curve (``"mean"`` for derived per-image values).
        protocol: The config's protocol for curve sections, ``None`` for the others.
        description: What a section without protocol shows (``""`` for curve sections).
        derived: Whether the section restates other sections (``road2022/combined``); its
            verdicts are not counted.
    """

    name: str
    higher_is_better: bool
    rule: str
    protocol: PerturbationProtocol | None = None
    description: str = ""
    derived: bool = False

    @property
    def decimals(self) -> int:
        """Decimals of the section's values in every table: 1 for percent AUCs, else 3."""
        return 1 if self.rule == "trapezoid_percent" else 3

    @property
    def fragile_margin(self) -> float:
        """:data:`FRAGILE_MARGIN` on this section's scale (100 for percent AUCs, else 1)."""
        return FRAGILE_MARGIN * (100.0 if self.rule == "trapezoid_percent" else 1.0)


def localisation_setting(config: dict) -> dict | None:
    """How a run compared maps with masks: ``{"upsample": None | "bilinear" | "nearest"}``.

    ``None`` for a run without masks; runs written before the setting existed upsampled
    bilinearly.
    """
    if not config.get("dataset", {}).get("masks"):
        return None
    return config.get("localisation", {"upsample": "bilinear"})


def verdict(diff_low: float, diff_high: float, higher_is_better: bool) -> str:
    """A method against the reference from the interval of ``AUC(reference) - AUC(method)``.

    Example:
        >>> verdict(0.01, 0.05, higher_is_better=False)  # the reference is higher: worse
        'better'
    """
    if diff_low > 0:
        return "worse" if higher_is_better else "better"
    if diff_high < 0:
        return "better" if higher_is_better else "worse"
    return "tie"


def is_fragile(section: Section, interval: tuple[float, float], again: tuple[float, float]) -> bool:
    """Whether a verdict is fragile (see the module docstring).

    Args:
        section: Supplies the direction and the scale of the margin.
        interval: The paired interval of the difference with the run's seed.
        again: The same interval with the second seed.
    """
    first = verdict(*interval, section.higher_is_better)
    if first != verdict(*again, section.higher_is_better):
        return True
    return first != "tie" and min(abs(interval[0]), abs(interval[1])) < section.fragile_margin


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
    """Rows of one section from aligned per-image curves ``{method: (n, S)}``.

    Every interval is drawn with ``seed``; the paired ones once more with ``seed + 1`` to
    tell fragile verdicts.
    """
    n = next(iter(curves.values())).shape[0]
    draws = [bootstrap_weights(n, n_boot, seed), bootstrap_weights(n, n_boot, seed + 1)]
    boots = {
        m: [area_under_curve(weights @ c, x, section.rule) for weights in draws]
        for m, c in curves.items()
    }
    aucs = {m: float(area_under_curve(c.mean(0), x, section.rule)) for m, c in curves.items()}
    per_image = {m: area_under_curve(c, x, section.rule) for m, c in curves.items()}
    rows = []
    for method in curves:
        row = MethodRow(
            section.name, method, n, aucs[method], *percentile_interval(boots[method][0])
        )
        if reference in curves and method != reference:
            ours, theirs = per_image[reference], per_image[method]
            better = ours > theirs if section.higher_is_better else ours < theirs
            interval, again = (
                percentile_interval(reference_boot - method_boot)
                for reference_boot, method_boot in zip(boots[reference], boots[method], strict=True)
            )
            row = dataclasses.replace(
                row,
                diff=aucs[reference] - aucs[method],
                diff_low=interval[0],
                diff_high=interval[1],
                share_reference_better=float(better.mean()),
                verdict=verdict(*interval, section.higher_is_better),
                fragile=is_fragile(section, interval, again),
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
            combined = Section(name, True, "mean", None, "(LeRF - MoRF) / 2 per image", True)
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
    subset: str = "all",
) -> BenchmarkReport:
    """Summarise benchmark records.

    Every protocol of the config gets a section, and so do the derived quantities:
    ``road2022/combined`` where both ROAD curves ran and ``localisation/<metric>`` for a
    dataset with masks. A method without any record for a section is listed in
    ``missing`` (the others are compared on the images they share). Protocols with
    ``shared_random_orders`` have a row for the official random baseline
    (``"random_shared"``) too.

    Args:
        records: Records of :func:`~class_space_saliency.evaluation.store.load_records`.
        config: The run's config (supplies the protocols and the method order).
        reference: Method every other method is compared with.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed (the second draw that tells fragile verdicts uses ``seed + 1``).
        subset: ``"all"`` evaluated images or only those the model classified
            ``"correct"``-ly (prediction = label on the clean image).

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
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    protocols = [PerturbationProtocol(**knobs) for knobs in config["protocols"]]
    methods = [m["name"] for m in config["methods"]]
    results = [r for r in records if r.get("method") is not None]
    images = {r["image"]: r for r in results}
    correct = [r["prediction"] == r["label"] for r in images.values()]
    if subset == "correct":
        results = [r for r in results if r["prediction"] == r["label"]]
        images = {r["image"]: r for r in results}
    localised = bool(config.get("dataset", {}).get("masks")) or any(
        r["protocol"] == LOCALISATION for r in results
    )
    sections, found = _per_image_values(results, protocols, localised)
    rows, mean_curves, missing = [], {}, []
    for section in sections:
        values = found.get(section.name, {})
        expected = methods
        if section.protocol is not None and section.protocol.shared_random_orders:
            expected = [*methods, SHARED_RANDOM]
        by_method = {
            m: {i: c for (method, i), c in values.items() if method == m} for m in expected
        }
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
        subset=subset,
    )


def _arrow(section: Section) -> str:
    return "↑" if section.higher_is_better else "↓"


def _value(value: float, low: float, high: float, decimals: int) -> str:
    """``value [low, high]`` with ``decimals`` fixed decimals ("-0.000" printed as "0.000")."""
    parts = [f"{round(v, decimals) + 0.0:.{decimals}f}" for v in (value, low, high)]
    return f"{parts[0]} [{parts[1]}, {parts[2]}]"


def verdict_cell(row: MethodRow) -> str:
    """The verdict as a table shows it: in parentheses where fragile."""
    return f"({row.verdict})" if row.fragile else str(row.verdict)


def verdict_counts(rows: Sequence[MethodRow]) -> str:
    """``"better / tie / worse / fragile"`` counts over ``rows`` (fragile ones apart)."""
    robust = [row.verdict for row in rows if not row.fragile]
    counts = [robust.count(v) for v in VERDICTS] + [sum(bool(row.fragile) for row in rows)]
    return " / ".join(str(count) for count in counts)


VERDICT_LEGEND = (
    "A method is **better** or **worse** than {reference} where the paired 95 % bootstrap "
    "interval of the AUC difference excludes zero, in the direction of the curve (↓ lower is "
    "better, ↑ higher is better), and **ties** otherwise. A verdict in parentheses is "
    "*fragile*: better or worse with an interval that ends within {margin:g} % of the AUC "
    "scale of zero (0.002 for scores in [0, 1], 0.2 for percent AUCs), or changed when the "
    "bootstrap is redrawn with seed {second}. Fragile verdicts and derived columns "
    "(road2022/combined restates the two ROAD curves) are not counted."
)


def verdict_table(report: BenchmarkReport, reference: str) -> list[str]:
    """Markdown lines: one row per method, one verdict column per section, the counts."""
    compared = [
        section
        for section in report.sections
        if any(r.protocol == section.name and r.verdict for r in report.rows)
    ]
    if not compared:
        return [f"No method was compared with {reference}.", ""]
    names = [f"{s.name} {_arrow(s)}" + (" (derived)" if s.derived else "") for s in compared]
    lines = [
        "| method | " + " | ".join(names) + " | better / tie / worse / fragile |",
        "|---" * (len(compared) + 2) + "|",
    ]
    rows = {(r.protocol, r.method): r for r in report.rows if r.verdict}
    for method in dict.fromkeys(r.method for r in report.rows if r.verdict):
        found = [rows.get((s.name, method)) for s in compared]
        cells = ["" if row is None else verdict_cell(row) for row in found]
        counted = [row for row, s in zip(found, compared, strict=True) if row and not s.derived]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {verdict_counts(counted)} |")
    return [*lines, ""]


def _section_lines(report: BenchmarkReport, section: Section, reference: str) -> list[str]:
    """The table of one section: value, gain over the reference, verdict, share of images."""
    lines = [f"## {section.name} ({'higher' if section.higher_is_better else 'lower'} is better)"]
    protocol = section.protocol
    if protocol is not None:
        knobs = protocol_to_dict(protocol)
        hidden = {"name", "steps"}
        if protocol.baseline != "blur":
            hidden |= {"blur_kernel_size", "blur_sigma"}
        if protocol.baseline != "impute":
            hidden.add("impute_noise")
        if not protocol.extra_scores:
            hidden.add("extra_scores")
        if protocol.unit != "pixel":
            hidden.add("upsample")
        if not protocol.shared_random_orders:
            hidden.add("shared_random_orders")
        shown = {k: v for k, v in knobs.items() if k not in hidden}
        steps = "every count 1 … N-1" if protocol.steps is None else list(protocol.steps)
        knob_text = ", ".join(f"{k}={v}" for k, v in shown.items()) + f", steps={steps}"
        lines += ["", f"Knobs: {knob_text}", ""]
        value = "AUC"
    else:
        lines += ["", f"{section.description}; mean over images.", ""]
        value = "mean"
    lines += [
        f"| method | images | {value} [95 % CI] | gain over {reference} [95 % CI] | verdict "
        f"| {reference} better on |",
        "|---|---|---|---|---|---|",
    ]
    decimals = section.decimals
    for row in (r for r in report.rows if r.protocol == section.name):
        gain = row.gain(section.higher_is_better)
        share = row.share_reference_better
        cells = [
            row.method,
            str(row.n_images),
            _value(row.auc, row.auc_low, row.auc_high, decimals),
            "" if gain is None else _value(*gain, decimals),
            "" if row.verdict is None else verdict_cell(row),
            "" if share is None else f"{share:.1%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        f"| {method} | 0 | missing (no records) | | | |"
        for name, method in report.missing
        if name == section.name
    ]
    return [*lines, ""]


def _markdown(report: BenchmarkReport, correct: BenchmarkReport, reference: str) -> str:
    config = report.config
    seed = config["seed"]
    lines = [
        "# Faithfulness benchmark",
        "",
        f"- model: {config['model']['name']} (fingerprint {config['model']['fingerprint']})",
        f"- images: {report.n_images} evaluated of {config['n']} requested, "
        f"{len(report.skipped)} unreadable; clean accuracy {report.clean_accuracy:.4f} "
        f"({correct.n_images} classified correctly)",
        f"- intervals: 95 % bootstrap over images (seed {seed}); numbers: AUC or mean "
        "[95 % interval]",
        f"- gain over {reference}: AUC(method) - AUC({reference}) on ↑ curves, "
        f"AUC({reference}) - AUC(method) on ↓ curves, so a positive gain means the method "
        f"is better; {reference} better on: the share of images whose own AUC is strictly "
        f"better for {reference} than for the method",
    ]
    localisation = localisation_setting(config)
    if localisation is not None:
        upsample = localisation["upsample"]
        rule = (
            "at the map's resolution (each cell weighted by its mask share)"
            if upsample is None
            else f"per pixel of the {upsample}-upsampled map"
        )
        lines.append(f"- localisation: {rule}")
    legend = VERDICT_LEGEND.format(
        reference=reference, margin=FRAGILE_MARGIN * 100, second=seed + 1
    )
    lines += ["", f"## Verdicts against {reference}", "", legend, ""]
    lines += verdict_table(report, reference)
    lines += [f"## Verdicts on the {correct.n_images} correctly classified images only", ""]
    lines += verdict_table(correct, reference)
    sections = report.sections
    for position, section in enumerate(sections):
        lines += _section_lines(report, section, reference)
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

    ``report.md`` opens with the verdicts of every method against ``reference`` on all
    images and on the correctly classified ones, then one table per section; ``report.csv``
    holds the rows of both (column ``subset``).

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
    report, correct = (
        summarize(records, config, reference=reference, n_boot=n_boot, seed=seed, subset=subset)
        for subset in SUBSETS
    )
    markdown = out_dir / "report.md"
    markdown.write_text(_markdown(report, correct, reference))
    table = out_dir / "report.csv"
    with open(table, "w", newline="") as handle:
        names = [f.name for f in dataclasses.fields(MethodRow)]
        writer = csv.DictWriter(handle, fieldnames=["subset", *names, "clean_accuracy"])
        writer.writeheader()
        for summary in (report, correct):
            for row in summary.rows:
                writer.writerow(
                    {
                        "subset": summary.subset,
                        **dataclasses.asdict(row),
                        "clean_accuracy": report.clean_accuracy,
                    }
                )
    report.files = [markdown, table, *_plot(report, out_dir)]
    return report
