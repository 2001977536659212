"""``OUT/report.md`` and ``OUT/report.json``: our numbers beside the paper's, per model and step.

The report is rebuilt from what the model folders hold (``steps.json``, the analyses'
``analysis.json``, the benchmark's ``summary.json``, ``value_vector_classes.json``), so it
covers every model run into the folder so far, whichever call ran it. Each entry of
:data:`~class_space_saliency.paper.PAPER_RESULTS` becomes one row: our value (found in the
step's JSON at :data:`RESULT_PATHS`), the paper's, the difference and the source; where our
value is missing the row says why ("not run: ..."), never fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis import ANALYSES
from ..paper import PAPER_MODELS, PAPER_RESULTS, PaperResult
from .plan import ReproductionPlan

_RESIDUAL = ("components", "residual")
RESULT_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("identifiability", "image_token_rate"): (
        "result", *_RESIDUAL, "identifiability_rate_percent",
    ),
    ("identifiability", "images_with_one"): (
        "result", *_RESIDUAL, "images_with_identifiable_token_percent",
    ),
    ("identifiability", "image_token_rate_untrained"): (
        "result", "baseline", *_RESIDUAL, "identifiability_rate_percent",
    ),
    ("identifiability", "images_with_one_untrained"): (
        "result", "baseline", *_RESIDUAL, "images_with_identifiable_token_percent",
    ),
    ("attention_knockout", "image_token_rate_unperturbed"): (
        "result", "runs", "none", "identifiability", *_RESIDUAL, "identifiability_rate_percent",
    ),
    ("attention_knockout", "image_token_rate_self_only"): (
        "result", "runs", "self_only", "identifiability", *_RESIDUAL,
        "identifiability_rate_percent",
    ),
    ("attention_knockout", "image_token_rate_no_cls"): (
        "result", "runs", "no_cls", "identifiability", *_RESIDUAL,
        "identifiability_rate_percent",
    ),
    ("context_removal", "object_token_rate_without_context"): (
        "result", "outcomes", "context", "official_rate_percent",
    ),
    ("context_removal", "object_token_rate_unperturbed"): (
        "result", "outcomes", "context", "unperturbed_top1_percent",
    ),
    ("context_removal", "context_token_rate_without_object"): (
        "result", "outcomes", "object", "official_rate_percent",
    ),
    ("context_removal", "context_token_rate_unperturbed"): (
        "result", "outcomes", "object", "unperturbed_top1_percent",
    ),
    ("context_identifiability", "attention_change_difference"): (
        "result", "attention_change_difference",
    ),
    ("context_identifiability", "attention_change_p_value"): (
        "result", "attention_change_p_value",
    ),
}  # fmt: skip
"""Where an analysis's stored entry (``analysis.json``: ``{"result": to_dict(), ...}``) holds
our value of a paper quantity: keys, then the block (the quantity's ``/<block>`` suffix, else
the last block). Quantities of the benchmark and the value-vector classes are found by
:func:`our_value` directly."""

OWN_STEPS = ("vilas2023", "value_vector_classes")
"""Paper analyses that ``reproduce`` runs itself (not entries of ``ANALYSES``)."""


@dataclass
class ReproductionReport:
    """What :func:`write_reproduction_report` wrote.

    Attributes:
        models: Per model key: ``name``, ``weights``, ``status`` and ``steps`` (per step:
            ``status``, ``reason``, ``figure`` and ``report`` paths relative to the folder).
        results: One dict per paper result: ``model``, ``analysis``, ``quantity``,
            ``description``, ``paper``, ``ours``, ``difference``, ``status``, ``source``,
            ``note``.
        files: ``[report.md, report.json]``.
    """

    models: dict[str, dict] = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _step_of(analysis: str) -> str:
    return analysis if analysis in OWN_STEPS else f"analyses/{analysis}"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _model_outputs(folder: Path) -> dict[str, Any]:
    """What a model's folder holds: step statuses and every step's JSON."""
    ledger = _read_json(folder / "steps.json") or {}
    stored = _read_json(folder / "analyses" / "analysis.json") or {}
    return {
        "config": ledger.get("config"),
        "steps": ledger.get("steps", {}),
        "analyses": stored.get("analyses", {}),
        "vilas2023": _read_json(folder / "vilas2023" / "summary.json"),
        "value_vector_classes": _read_json(folder / "value_vector_classes.json"),
    }


def _follow(content: Any, path: tuple) -> Any:
    for key in path:
        if (isinstance(content, Mapping) and key in content) or (
            isinstance(content, list)
            and isinstance(key, int)
            and -len(content) <= key < len(content)
        ):
            content = content[key]
        else:
            return None
    return content


def our_value(result: PaperResult, outputs: Mapping[str, Any]) -> tuple[Any, str]:
    """Our value of a paper result from a model's outputs, and a note on it.

    Args:
        result: The paper's entry.
        outputs: The model folder's step outputs (``analyses``: ``analysis.json``'s entries;
            ``vilas2023``: the benchmark summary; ``value_vector_classes``).

    Returns:
        ``(value, note)``; the value is ``None`` where the outputs do not hold it, and the
        note then says why.
    """
    if result.analysis == "vilas2023":
        summary = outputs.get("vilas2023") or {}
        if result.quantity == "accuracy":
            return summary.get("clean_accuracy_percent"), ""
        _, order, method = result.quantity.split("/")
        rows = _follow(summary, ("auc", f"vilas2023/{order}")) or {}
        note = ""
        if method == "random" and "random_shared" in rows:
            method = "random_shared"
        elif method == "random":
            note = "ours: a random order per image, not the official shared orders"
        if method not in rows:
            reason = summary.get("not_applicable", {}).get(method)
            return None, f"not applicable: {reason}" if reason else f"map {method!r} not run"
        return rows[method]["auc"], note
    if result.analysis == "value_vector_classes":
        return _follow(outputs.get("value_vector_classes"), (result.quantity,)), ""
    stem, _, block = result.quantity.partition("/")
    path = RESULT_PATHS.get((result.analysis, stem))
    if path is None:
        return None, f"no path to {result.quantity!r} in RESULT_PATHS"
    entry = outputs.get("analyses", {}).get(result.analysis)
    return _follow(entry, (*path, int(block) if block else -1)), ""


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list | tuple):
        return "; ".join(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _compare(ours: Any, paper: Any) -> Any:
    if ours is None:
        return None
    if isinstance(paper, tuple):
        found = sum(name in ours for name in paper)
        return "same" if list(ours) == list(paper) else f"{found} of {len(paper)} in ours"
    return float(ours) - float(paper)


def _step_status(
    key: str, step: str, outputs: Mapping[str, Any], plan: ReproductionPlan, failure: str
) -> tuple[str, str]:
    """``(status, reason)`` of a model's step: done, skipped, failed or not run."""
    analysis = step.partition("/")[2] if step.startswith("analyses/") else step
    if analysis not in ANALYSES and analysis not in OWN_STEPS:
        return "not run", f"this version has no analysis {analysis!r}"
    recorded = outputs["steps"].get(step)
    if recorded is not None:
        return recorded["status"], recorded.get("reason", "")
    asked = {model.model.key: model for model in plan.models}
    if key not in asked:
        return "not run", "model not asked for (--models)"
    model_plan = asked[key]
    if "model" in model_plan.not_run:
        return "not run", model_plan.not_run["model"]
    if failure:
        return "failed", failure
    if step in model_plan.not_run:
        return "not run", model_plan.not_run[step]
    return "not run", "step not asked for (--steps, --analyses)"


def _figure_and_report(key: str, step: str, out: Path) -> tuple[str | None, str | None]:
    if step.startswith("analyses/"):
        name = step.partition("/")[2]
        figure, report = f"{key}/analyses/{name}.png", f"{key}/analyses/report.md"
    elif step == "vilas2023":
        figure, report = f"{key}/vilas2023/curves_vilas2023.png", f"{key}/vilas2023/report.md"
    else:
        figure, report = None, f"{key}/{step}.json"
    exists = [None if p is None or not (out / p).is_file() else p for p in (figure, report)]
    return exists[0], exists[1]


def write_reproduction_report(
    out_dir: str | Path, plan: ReproductionPlan, failures: Mapping[str, str] | None = None
) -> ReproductionReport:
    """Write ``report.md`` and ``report.json`` from the model folders under ``out_dir``.

    Args:
        out_dir: The ``reproduce`` output folder.
        plan: The plan of the current call (what was asked for, and why models or steps
            could not run).
        failures: ``{model key: reason}`` of models that could not be loaded in this call.

    Returns:
        The :class:`ReproductionReport`.
    """
    out = Path(out_dir)
    failures = dict(failures or {})
    planned = {model.model.key: model for model in plan.models}
    report = ReproductionReport()
    for key, spec in PAPER_MODELS.items():
        outputs = _model_outputs(out / key)
        model_plan = planned.get(key)
        steps = list(model_plan.steps) if model_plan else list(outputs["steps"])
        steps += [s for s in (model_plan.not_run if model_plan else {}) if s != "model"]
        steps += [
            _step_of(r.analysis) for r in PAPER_RESULTS if r.model == key
        ]  # paper analyses this version lacks
        entry_steps = {}
        for step in dict.fromkeys(steps):
            status, reason = _step_status(key, step, outputs, plan, failures.get(key, ""))
            figure, details = _figure_and_report(key, step, out)
            entry_steps[step] = {
                "status": status,
                "reason": reason,
                "figure": figure if status == "done" else None,
                "report": details if status == "done" else None,
            }
        ran = bool(outputs["steps"])
        weights = model_plan.weights if model_plan else (outputs["config"] or {}).get("weights")
        report.models[key] = {
            "name": spec.name,
            "weights": weights or (f"timm {spec.timm_name}" if spec.tag else spec.checkpoint),
            "status": "ran" if ran else "not run",
            "steps": entry_steps,
        }
        for result in (r for r in PAPER_RESULTS if r.model == key):
            step = entry_steps[_step_of(result.analysis)]
            ours, note = our_value(result, outputs) if step["status"] == "done" else (None, "")
            if step["status"] != "done":
                status = f"{step['status']}: {step['reason']}" if step["reason"] else step["status"]
            elif ours is None:
                status, note = f"not in the result{': ' + note if note else ''}", ""
            else:
                status = "ok"
            report.results.append(
                {
                    "model": key,
                    "analysis": result.analysis,
                    "quantity": result.quantity,
                    "description": result.description,
                    "paper": list(result.value)
                    if isinstance(result.value, tuple)
                    else result.value,
                    "ours": ours,
                    "difference": _compare(ours, result.value),
                    "status": status,
                    "source": result.source,
                    "note": "; ".join(n for n in (result.note, note) if n),
                }
            )
    markdown, data = out / "report.md", out / "report.json"
    _write_atomically(markdown, _markdown(report, plan))
    _write_atomically(
        data, json.dumps({"models": report.models, "results": report.results}, indent=1) + "\n"
    )
    report.files = [markdown, data]
    return report


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _markdown(report: ReproductionReport, plan: ReproductionPlan) -> str:
    lines = [
        "# Reproduction of Vilas, Schaumlöffel & Roig (NeurIPS 2023)",
        "",
        "Written by `class-space-saliency reproduce`. The paper's numbers are the outputs of "
        "the official notebooks (martinagvilas/vit-cls_emb); each row names its cell. Rows "
        "whose step did not run say why.",
        "",
        "## Our numbers beside the paper's",
        "",
        "| model | analysis | quantity | ours | paper | ours − paper | status | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report.results:
        difference = row["difference"]
        shown = f"{difference:+.3g}" if isinstance(difference, float) else _format(difference)
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(
            f"| {row['model']} | {row['analysis']} | {row['description']}{note} | "
            f"{_format(row['ours'])} | {_format(row['paper'])} | {shown} | {row['status']} | "
            f"{row['source']} |"
        )
    lines += ["", "## Models and steps"]
    for key, model in report.models.items():
        lines += [
            "",
            f"### {model['name']} (`{key}`)",
            "",
            f"Weights: {model['weights']}.",
            "",
            "| step | status | figure | details |",
            "|---|---|---|---|",
        ]
        for step, entry in model["steps"].items():
            status = entry["status"] + (f": {entry['reason']}" if entry["reason"] else "")
            figure = (
                f"[{Path(entry['figure']).name}]({entry['figure']})" if entry["figure"] else "–"
            )
            details = (
                f"[{Path(entry['report']).name}]({entry['report']})" if entry["report"] else "–"
            )
            lines.append(f"| {step} | {status} | {figure} | {details} |")
    return "\n".join(lines) + "\n"
