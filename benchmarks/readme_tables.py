"""Write the result tables of the README and the docs from the committed JSON, or check them.

Every table of the README and of the docs pages (``docs/**/*.md``) sits between two marker
comments::

    <!-- table:MODEL/RUN/KIND:start -->
    | method | ... |
    <!-- table:MODEL/RUN/KIND:end -->

``MODEL/demo/identifiability`` tables come from the demo summary of that embedded model
(``docs/demo_summary.json`` for fashion-scenes, ``docs/fashion/demo_summary.json`` for fashion,
written by ``class-space-saliency demo``): class identifiability by block.

Otherwise ``MODEL`` and ``RUN`` select ``models[MODEL][RUN]`` of
``benchmarks/results/faithfulness.json``
(written by ``benchmarks/faithfulness.py``); ``KIND`` is ``faithfulness`` (one column per
perturbation curve and derived ROAD value: AUC [95 % bootstrap interval]) or ``localisation``
(one column per localisation metric: mean [interval]), optionally followed by

- ``-diff``: the paired difference ``class_space - method`` [95 % interval];
- ``-verdict``: how each method compares with ``class_space``;
- ``-vs-random``: how each method compares with ``random`` on the same images;
- ``-correct``: how each method compares with ``class_space`` on the correctly classified
  images only;
- ``-vs-METHOD``: how each method compares with ``METHOD`` on the same images, where the run
  compared with it (``benchmarks/faithfulness.py``'s ``REFERENCES``: ``random``, ``chefer``,
  the field's strongest simple baseline, and ``class_space_gradient_paper``, the paper's map).

``MODEL/diagnose/METHOD`` is the octile table of one method from
``benchmarks/results/diagnose_ranking_MODEL.json`` (``benchmarks/diagnose_ranking.py``),
``MODEL/diagnose/extremes`` the top and bottom octiles of the default map, the contribution
map, ``chefer`` and ``random`` side by side, and
``all/timings/timings`` the timing table of ``benchmarks/results/timings.json``
(``benchmarks/timings.py``), ``all/speed/time``, ``all/speed/memory`` and
``all/speed/targets`` the selected ratios to the forward and the targets of
``benchmarks/results/speed.json`` (``benchmarks/speed.py``).

``MODEL/RUN/upsample-shift`` shows how much each AUC moved from ``RUN`` (bilinear upsampling)
to ``RUN_nearest`` (patch-aligned, from ``faithfulness.py --upsample nearest``), and which
verdicts changed.

A verdict is ``better`` or ``worse`` (in the curve's direction) only where the paired 95 %
bootstrap interval of the difference excludes zero, ``tie`` otherwise. A fragile verdict (its
interval ends within 0.2 % of the AUC scale of zero, or it changes under a second bootstrap
seed: see ``class_space_saliency.evaluation.report``) is shown in parentheses; the last column
counts better / tie / worse / fragile, leaving fragile verdicts and derived columns
(``road2022/combined``, marked) out of the first three. The reference's own row is left out of
the comparison tables. The text between the markers is replaced; everything else of the README
is left alone.

Example:
    python benchmarks/readme_tables.py            # rewrite the tables of README.md and docs/
    python benchmarks/readme_tables.py --check    # exit 1 if a page differs from the JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from class_space_saliency.evaluation.report import verdict as interval_verdict

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(
    r"(<!-- table:(?P<key>[\w.-]+/[\w.-]+/[\w-]+):start -->\n)(?P<body>.*?)"
    r"(<!-- table:(?P=key):end -->)",
    re.DOTALL,
)
LOCALISATION = "localisation/"
DEMO_SUMMARIES = {
    "fashion-scenes": ROOT / "docs" / "demo_summary.json",
    "fashion": ROOT / "docs" / "fashion" / "demo_summary.json",
}


def _decimals(section: dict) -> int:
    return 1 if section["rule"] == "trapezoid_percent" else 3


def _cell(value: float | None, low: float | None, high: float | None, decimals: int) -> str:
    if value is None:
        return ""
    return f"{value:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


COMPARISONS = {"": "rows", "diff": "rows", "verdict": "rows", "correct": "rows_correct"}
"""Table kind suffix -> key of the run's rows it reads (``vs-METHOD`` reads ``rows_vs_METHOD``)."""


def rows_key(suffix: str) -> str:
    """The key of the run's rows that a table kind's suffix reads.

    Raises:
        ValueError: For a suffix that is neither in :data:`COMPARISONS` nor ``vs-METHOD``.
    """
    if suffix in COMPARISONS:
        return COMPARISONS[suffix]
    if suffix.startswith("vs-") and len(suffix) > 3:
        return "rows_vs_" + suffix.removeprefix("vs-")
    raise ValueError(f"unknown table kind suffix {suffix!r}")


SHIFTS = {"upsample-shift": "{run}_nearest"}
"""Shift table kind -> the other run it compares ``RUN`` with."""


def verdict(row: dict, higher_is_better: bool) -> str:
    """``better``/``worse``/``tie`` of ``row["method"]`` against the row's reference.

    ``row["diff"]`` is ``AUC(reference) - AUC(method)`` with a paired 95 % interval; the method
    is better or worse only where that interval excludes zero. In parentheses where the row
    says the verdict is fragile.
    """
    found = interval_verdict(row["diff_low"], row["diff_high"], higher_is_better)
    return f"({found})" if row.get("fragile") else found


def _verdict_counts(cells: list[str]) -> str:
    counts = [cells.count(v) for v in ("better", "tie", "worse")]
    counts.append(sum(cell.startswith("(") for cell in cells))
    return " / ".join(str(count) for count in counts)


def render(run: dict, kind: str) -> str:
    """The Markdown table of one run (``models[MODEL][RUN]`` of the JSON) for ``kind``.

    Args:
        run: ``{"sections": [{"name", "higher_is_better", "rule"}], "rows": [...],
            "rows_vs_random": [...], "missing": [[section, method], ...]}``.
        kind: ``faithfulness`` or ``localisation``, optionally with a suffix ``-diff``,
            ``-verdict``, ``-correct`` or ``-vs-METHOD``.

    Returns:
        The table, one line per method in row order, ending with a newline.

    Raises:
        ValueError: For an unknown kind or a run without sections or comparisons of that kind.
    """
    base, _, suffix = kind.partition("-")
    if base not in ("faithfulness", "localisation"):
        raise ValueError(f"unknown table kind {kind!r}")
    key = rows_key(suffix)
    sections = [
        s for s in run["sections"] if s["name"].startswith(LOCALISATION) == (base == "localisation")
    ]
    if not sections:
        raise ValueError(f"the run has no {base} results")
    if key not in run:
        raise ValueError(f"the run has no {key} (rerun benchmarks/faithfulness.py)")
    rows = {(r["protocol"], r["method"]): r for r in run[key]}
    missing = {tuple(pair) for pair in run.get("missing", [])}
    methods = list(dict.fromkeys(r["method"] for r in run["rows"]))
    methods += [m for _, m in sorted(missing) if m not in methods]

    def name(section: dict) -> str:
        shown = section["name"].removeprefix(LOCALISATION)
        derived = " (derived)" if section.get("derived") and counted else ""
        return f"{shown} {'↑' if section['higher_is_better'] else '↓'}{derived}"

    def cell(section: dict, row: dict) -> str:
        if suffix == "diff":
            return _cell(row["diff"], row["diff_low"], row["diff_high"], _decimals(section))
        if suffix:
            return "" if row["diff"] is None else verdict(row, section["higher_is_better"])
        return _cell(row["auc"], row["auc_low"], row["auc_high"], _decimals(section))

    counted = suffix not in ("", "diff")
    header = [name(s) for s in sections] + (["better / tie / worse / fragile"] if counted else [])
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for method in methods:
        cells = []
        for section in sections:
            row = rows.get((section["name"], method))
            if row is None:
                cells.append("missing" if (section["name"], method) in missing else "")
            else:
                cells.append(cell(section, row))
        if suffix and not any(cells):
            continue  # the reference
        if counted:
            kept = [c for c, s in zip(cells, sections, strict=True) if not s.get("derived")]
            cells.append(_verdict_counts(kept))
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_shift(new: dict, old: dict) -> str:
    """AUC(new) - AUC(old) per method and curve both runs have, with the verdicts that changed.

    Args:
        new: The run after the change (``models[MODEL][RUN_nearest]``: patch-aligned).
        old: The run before it (``models[MODEL][RUN]``: bilinear upsampling).

    Returns:
        The Markdown table; a cell reads ``+0.012`` or, where a verdict against
        ``class_space`` or another reference of both runs changed, e.g.
        ``-0.030 (vs random: worse → tie)``.
    """
    curves = [
        s
        for s in old["sections"]
        if not s["name"].startswith(LOCALISATION)
        and any(n["name"] == s["name"] for n in new["sections"])
    ]
    keys = ["rows"] + [k for k in old if k.startswith("rows_vs_") and k in new]
    tables = {
        (run_name, key): {(r["protocol"], r["method"]): r for r in run[key]}
        for run_name, run in (("new", new), ("old", old))
        for key in keys
    }
    rerun = {r["method"] for r in new["rows"]}
    methods = [m for m in dict.fromkeys(r["method"] for r in old["rows"]) if m in rerun]
    lines = [
        "| method | " + " | ".join(s["name"] for s in curves) + " |",
        "|---" * (len(curves) + 1) + "|",
    ]
    for method in methods:
        cells = []
        for section in curves:
            pair = (section["name"], method)
            if pair not in tables["new", "rows"] or pair not in tables["old", "rows"]:
                cells.append("")  # e.g. random_shared beside a curve it does not run on
                continue
            shift = tables["new", "rows"][pair]["auc"] - tables["old", "rows"][pair]["auc"]
            decimals = _decimals(section)
            cell = f"{round(shift, decimals) + 0.0:+.{decimals}f}"  # + 0.0: no "-0.000"
            for key in keys:
                against = key.removeprefix("rows_vs_") if key != "rows" else "class_space"
                before, after = tables["old", key].get(pair), tables["new", key].get(pair)
                if before is None or after is None or before["diff"] is None:
                    continue
                was = verdict(before, section["higher_is_better"])
                now = verdict(after, section["higher_is_better"])
                if was != now:
                    cell += f" (vs {against}: {was} → {now})"
            cells.append(cell)
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_identifiability(summary: dict) -> str:
    """Class identifiability by block (residual stream) from a demo summary, as Markdown."""
    table = summary["identifiability"]
    layers = table["layers"]
    rows = [
        ("image tokens whose top-1 class is the label (%)", table["token_rate"], ".2f"),
        ("mean normalised rank of the label, image tokens", table["token_rank"], ".3f"),
    ]
    if table.get("cls_rate") is not None:
        rows.append(("[CLS] top-1 = label (%)", table["cls_rate"], ".1f"))
    lines = [
        "| layer | " + " | ".join(str(layer) for layer in layers) + " |",
        "|---" * (len(layers) + 1) + "|",
    ]
    lines += [f"| {name} | " + " | ".join(f"{v:{fmt}}" for v in values) + " |"
              for name, values, fmt in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def render_timings(timings: dict) -> str:
    """What a user waits for (``benchmarks/timings.py``): wall and CPU time per command."""
    machine = timings["machine"]

    def seconds(value: float) -> str:
        return f"{value:.2f} s" if value < 1 else f"{value:.1f} s"

    lines = ["| command | wall time | CPU time |", "|---|---|---|"]
    for row in timings["commands"].values():
        command = "class-space-saliency " + " ".join(row["arguments"])
        wall, cpu = seconds(row["wall_seconds"]), seconds(row["cpu_seconds"])
        lines.append(f"| `{command}` | {wall} | {cpu} |")
    gpu = machine["gpu"] or "no GPU"
    lines += [
        "",
        f"*Measured by `benchmarks/timings.py` (`benchmarks/results/timings.json`): "
        f"{machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']} with "
        f"{machine['torch_threads']} threads, {gpu}; load average "
        f"{machine['load_average_before']} before the run.*",
    ]
    return "\n".join(lines) + "\n"


def render_diagnosis(diagnosis: dict, method: str) -> str:
    """One method's octile table of ``benchmarks/diagnose_ranking.py``."""
    columns = diagnosis["columns"]
    lines = ["| octile | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for octile, row in enumerate(diagnosis["octiles"][method], 1):
        cells = [f"{value:.1f}" for value in row[:-1]] + [f"{row[-1]:.3f}"]
        lines.append(f"| {octile} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


EXTREMES = ("class_space", "class_space_contributions", "chefer", "random")
"""Methods of the ``MODEL/diagnose/extremes`` table."""


def render_diagnosis_extremes(diagnosis: dict) -> str:
    """The top and bottom octiles of :data:`EXTREMES`: [CLS] attention and logit drop."""
    attention = diagnosis["columns"].index("[CLS] attention")
    drop = diagnosis["columns"].index("logit drop")
    lines = [
        "| method | top octile: [CLS] attention | top octile: logit drop "
        "| bottom octile: [CLS] attention | bottom octile: logit drop |",
        "|---|---|---|---|---|",
    ]
    for method in EXTREMES:
        top, bottom = diagnosis["octiles"][method][0], diagnosis["octiles"][method][-1]
        cells = [f"{top[attention]:.1f} %", f"{top[drop]:.3f}"]
        cells += [f"{bottom[attention]:.1f} %", f"{bottom[drop]:.3f}"]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fill(readme: str, results: dict) -> str:
    """``readme`` with every marked table rewritten from ``results`` (the JSON).

    Raises:
        ValueError: For a marker naming a model, run or kind the JSON lacks, or for no
            markers at all.
    """

    def replace(match: re.Match) -> str:
        model, run, kind = match["key"].split("/")
        if run == "diagnose":  # MODEL/diagnose/METHOD (or /extremes): the ranking diagnosis
            path = ROOT / "benchmarks" / "results" / f"diagnose_ranking_{model}.json"
            diagnosis = json.loads(path.read_text())
            if kind == "extremes":
                table = render_diagnosis_extremes(diagnosis)
            else:
                table = render_diagnosis(diagnosis, kind)
            return match.group(1) + table + match.group(4)
        if run == "speed":  # all/speed/{time,memory,targets}: benchmarks/speed.py's report
            from speedkit.render import render_selected, render_targets  # benchmarks/speedkit

            report = json.loads((ROOT / "benchmarks" / "results" / "speed.json").read_text())
            table = render_targets(report) if kind == "targets" else render_selected(report, kind)
            return match.group(1) + table + match.group(4)
        if kind == "timings":
            timings = json.loads((ROOT / "benchmarks" / "results" / "timings.json").read_text())
            return match.group(1) + render_timings(timings) + match.group(4)
        if kind == "identifiability":
            if model not in DEMO_SUMMARIES:
                raise ValueError(f"table {match['key']}: no demo summary for {model}")
            summary = json.loads(DEMO_SUMMARIES[model].read_text())
            return match.group(1) + render_identifiability(summary) + match.group(4)
        other = SHIFTS.get(kind)
        runs = [run] if other is None else [other.format(run=run), run]  # new, old
        try:
            data = [results["models"][model][name] for name in runs]
        except KeyError:
            raise ValueError(f"table {match['key']}: no results for {model}/{runs}") from None
        table = render(data[0], kind) if other is None else render_shift(*data)
        return match.group(1) + table + match.group(4)

    text, count = MARKER.subn(replace, readme)
    if not count:
        raise ValueError("no <!-- table:MODEL/RUN/KIND:start --> markers found")
    return text


def pages() -> list[Path]:
    """The README and every docs page with at least one table marker."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [page for page in found if MARKER.search(page.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pages", type=Path, nargs="+", default=None, help="default: README.md and docs/"
    )
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "faithfulness.json"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a page differs")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    stale = 0
    for page in args.pages or pages():
        text = page.read_text()
        try:
            filled = fill(text, results)
        except ValueError as error:
            print(f"error: {page}: {error}", file=sys.stderr)
            return 2
        if filled == text:
            continue
        if args.check:
            keys = [
                m["key"]
                for m, n in zip(MARKER.finditer(text), MARKER.finditer(filled), strict=True)
                if m["body"] != n["body"]
            ]
            print(f"{page} differs from {args.results} in: {', '.join(keys)}")
            stale += 1
        else:
            page.write_text(filled)
            print(f"wrote the tables of {page}")
    if args.check and not stale:
        print(f"every table matches {args.results}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
