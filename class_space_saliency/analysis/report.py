"""Run several analyses on one model and write what ``analyze`` writes.

:func:`run_analyses` runs the chosen analyses of :data:`ANALYSES` one after the other and
writes, into one folder, ``analysis.json`` (every result's ``to_dict()`` and markdown table,
with the run's configuration), one figure per analysis, and ``report.md`` (each analysis
with a paragraph on what it measures, the paper's figure to compare with, its table and its
figure). ``analysis.json`` is rewritten after every analysis, so an interrupted run keeps
what finished, and running the same configuration again skips the analyses already done.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ._result import AnalysisResult, json_safe
from ._stream import Data
from .identifiability import identifiability


@dataclass(frozen=True)
class AnalysisSpec:
    """One analysis as ``analyze`` runs it.

    Attributes:
        name: Its name in ``--analyses``, the JSON and the report.
        run: ``run(model, data, baseline=..., **common)`` -> result, where ``common`` are
            ``num_images``, ``batch_size`` and ``progress``.
        description: What it measures (a paragraph of the report).
        paper: What the paper reports for it, to compare with (``""`` if nothing).
        needs_masks: Skipped (with a note) for data without object masks.
        cost: Forward-pass equivalents per image, the model and its baseline together (a
            backward pass counts as two), for run-time estimates such as ``reproduce
            --dry-run``.
    """

    name: str
    run: Callable[..., AnalysisResult]
    description: str
    paper: str = ""
    needs_masks: bool = False
    cost: float = 2.0


def _identifiability(model: nn.Module, data: Data, baseline: nn.Module | None, **common):
    return identifiability(
        model, data, components=("residual", "attention", "mlp"), baseline=baseline, **common
    )


ANALYSES: dict[str, AnalysisSpec] = {
    spec.name: spec
    for spec in (
        AnalysisSpec(
            "identifiability",
            _identifiability,
            "Class identifiability of [CLS] and image tokens per block, for the residual "
            "stream and the attention and MLP branches: the label's normalised rank "
            "1 - k/C in each token's class-space projection (1 = top-1), the share of image "
            "tokens whose top-1 class is the label (per image, averaged), and the share of "
            "images with at least one such token; against the untrained baseline, a one-sided "
            "Wilcoxon signed-rank test per block, paired by image and token.",
            "ViT-B/32 on ImageNet-S, last block: 60.73 % of image tokens identifiable, 95.58 % "
            "of images with at least one; random-weight models near chance (Table 1, Fig. 2).",
            cost=2.0,
        ),
    )
}
"""Every analysis ``analyze`` can run, by name, in the report's order."""


@dataclass
class AnalysisReport:
    """What :func:`run_analyses` wrote.

    Attributes:
        results: ``{name: result}`` of the analyses computed in this call.
        stored: ``{name: stored entry}`` of every analysis in ``analysis.json`` (``result``:
            the result's ``to_dict()``; ``table``: its markdown).
        skipped: ``{name: reason}`` of analyses that could not run on this data.
        files: Files written.
    """

    results: dict[str, AnalysisResult] = field(default_factory=dict)
    stored: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def run_analyses(
    model: nn.Module,
    data: Data,
    out_dir: str | Path,
    *,
    analyses: Sequence[str] | None = None,
    baseline: nn.Module | None = None,
    has_masks: bool = False,
    num_images: int | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
    config: dict[str, Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> AnalysisReport:
    """Run analyses of :data:`ANALYSES` on ``model`` and write the report folder.

    Args:
        model: The model to analyse.
        data: Its data, in any form the analyses take (re-iterable: each analysis reads
            it once).
        out_dir: Output folder; one holding another configuration raises ``ValueError``.
        analyses: Names to run (default: all, in :data:`ANALYSES` order).
        baseline: The untrained twin (see :func:`~class_space_saliency.untrained.untrained_copy`),
            or ``None`` for no comparison.
        has_masks: Whether ``data`` carries object masks (else mask analyses are skipped).
        num_images: Analyse the first ``num_images`` images.
        batch_size: Images per forward pass.
        progress: Progress bars (``None``: on a terminal).
        config: What identifies the run (model name and fingerprint, data, seeds ...),
            recorded in ``analysis.json`` and compared on a rerun.
        options: Keyword options per analysis name, passed to its ``run`` beside the common
            ones, e.g. ``{"context_removal": {"rule": "nearest"}}``. They are not recorded:
            put what identifies them into ``config``.

    Returns:
        An :class:`AnalysisReport`.

    Raises:
        ValueError: For an unknown analysis name (also in ``options``), or ``out_dir``
            holding another run.

    Example:
        >>> report = run_analyses(model, (images, labels), "out", analyses=["identifiability"])
        >>> sorted(path.name for path in report.files)
        ['analysis.json', 'identifiability.png', 'report.md']
    """
    names = list(ANALYSES) if analyses is None else list(dict.fromkeys(analyses))
    unknown = [name for name in names if name not in ANALYSES]
    if unknown or not names:
        raise ValueError(f"analyses must be names of {list(ANALYSES)}, got {unknown or names}")
    options = dict(options or {})
    unknown = [name for name in options if name not in ANALYSES]
    if unknown:
        raise ValueError(f"options must be keyed by names of {list(ANALYSES)}, got {unknown}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json_safe(
        {**(config or {}), "num_images": num_images, "baseline": baseline is not None}
    )
    path = out / "analysis.json"
    stored: dict[str, dict] = {}
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("config") != config:
            raise ValueError(
                f"{out} holds analyses of another configuration ({previous.get('config')}); "
                "choose another --out or delete it"
            )
        stored = previous.get("analyses", {})
    report = AnalysisReport(stored=stored)
    common = dict(num_images=num_images, batch_size=batch_size, progress=progress)
    for name in names:
        spec = ANALYSES[name]
        if name in stored and (out / f"{name}.png").exists():
            continue
        if spec.needs_masks and not has_masks:
            report.skipped[name] = "needs object masks; the data has none"
            continue
        if progress is not False:
            print(f"analysis: {name}", file=sys.stderr)
        result = spec.run(model, data, baseline, **common, **options.get(name, {}))
        report.results[name] = result
        _save_figure(result, out / f"{name}.png")
        stored[name] = {"result": result.to_dict(), "table": result.table()}
        _write_json(path, {"config": config, "analyses": stored})
    _write_json(path, {"config": config, "analyses": stored})
    (out / "report.md").write_text(_markdown(config, stored, report.skipped))
    figures = [out / f"{name}.png" for name in stored if (out / f"{name}.png").exists()]
    report.files = sorted([path, out / "report.md", *figures])
    return report


def _save_figure(result: AnalysisResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = result.plot()
    figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)


def _write_json(path: Path, content: dict) -> None:
    """Write atomically: an interruption never leaves half a file."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(partial, path)


def _markdown(config: dict, stored: dict[str, dict], skipped: dict[str, str]) -> str:
    lines = ["# Class-space analyses", ""]
    lines += [f"- {key}: {value}" for key, value in config.items()]
    for name, spec in ANALYSES.items():
        if name in skipped:
            lines += ["", f"## {name}", "", f"Not run: {skipped[name]}."]
        if name not in stored:
            continue
        lines += ["", f"## {name}", "", spec.description]
        if spec.paper:
            lines += ["", f"The paper: {spec.paper}"]
        lines += ["", stored[name]["table"], "", f"![{name}]({name}.png)"]
    return "\n".join(lines) + "\n"
