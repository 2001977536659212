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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import UnsupportedModelError
from ..anatomy import ViTAnatomy
from ._result import AnalysisResult, json_safe
from ._stream import Data, stream
from .context import context_identifiability, context_removal
from .identifiability import identifiability
from .knockouts import attention_knockout
from .memories import key_value_agreement, value_vectors
from .patching import other_class_partners, patching_grid
from .probes import linear_probes
from .sublayers import logit_increment, residual_composition, sublayer_changes


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
        requires: Options ``run`` cannot do without (e.g. the probes' ``train`` data):
            skipped (with a note) where ``run_analyses`` is not given them.
    """

    name: str
    run: Callable[..., AnalysisResult]
    description: str
    paper: str = ""
    needs_masks: bool = False
    cost: float = 2.0
    requires: tuple[str, ...] = ()


def _identifiability(model: nn.Module, data: Data, baseline: nn.Module | None, **options):
    options.setdefault("components", ("residual", "attention", "mlp"))
    return identifiability(model, data, baseline=baseline, **options)


def _with_baseline(function: Callable[..., AnalysisResult]) -> Callable[..., AnalysisResult]:
    """``run`` of an analysis that takes ``baseline=``."""

    def run(model: nn.Module, data: Data, baseline: nn.Module | None, **options):
        return function(model, data, baseline=baseline, **options)

    return run


def _without_baseline(function: Callable[..., AnalysisResult]) -> Callable[..., AnalysisResult]:
    """``run`` of an analysis that compares within the model (no baseline)."""

    def run(model: nn.Module, data: Data, baseline: nn.Module | None, **options):
        return function(model, data, **options)

    return run


PATCHING_PAIRS = 64
"""Image pairs of the patching grid in ``analyze`` (each image with the next of another class)."""


def _patching(model: nn.Module, data: Data, baseline: nn.Module | None, **options):
    """The patching grid of the first :data:`PATCHING_PAIRS` images, each clean image paired
    with the next image of another label as the corrupted one."""
    anatomy = ViTAnatomy.from_model(model)
    limit = min(options.pop("num_images", None) or PATCHING_PAIRS, PATCHING_PAIRS)
    batches = list(stream(anatomy, data, num_images=limit, progress=False))
    images = torch.cat([batch.images for batch in batches])
    labels = torch.cat([batch.labels for batch in batches])
    options.pop("batch_size", None)
    partners = other_class_partners(labels)
    return patching_grid(model, (images, labels), images[partners], **options)


def _value_vectors(model: nn.Module, data: Data, baseline: nn.Module | None, **options):
    for unused in ("num_images", "batch_size", "progress"):  # it reads weights, not data
        options.pop(unused, None)
    return value_vectors(model, baseline=baseline, **options)


def _linear_probes(model: nn.Module, data: Data, baseline: nn.Module | None, **options):
    num_images = options.pop("num_images", None)
    return linear_probes(model, options.pop("train"), data, num_test=num_images, **options)


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
        AnalysisSpec(
            "logit_increment",
            _with_baseline(logit_increment),
            "Per block, the share of tokens ([CLS] and image tokens) whose label logit rises "
            "from the block's input to its output, against the untrained baseline (one-sided "
            "exact McNemar test paired by image and token).",
            "The official plot_logits_increment: 50-100 % of image tokens gain label logit per "
            "block in the paper's ViTs (notebook 1).",
            cost=3.0,
        ),
        AnalysisSpec(
            "sublayer_changes",
            _with_baseline(sublayer_changes),
            "Per block, the share of tokens whose label logit is higher after projecting the "
            "attention output than the attention's input (the block input), and the MLP output "
            "than the MLP's input (the stream after the attention add; official=True compares "
            "with the block input, as the official code).",
            "Attention and MLP sublayers raise the label's logit for different shares of "
            "tokens along the blocks (notebook 2, plot_class_building).",
            cost=3.0,
        ),
        AnalysisSpec(
            "residual_composition",
            _without_baseline(residual_composition),
            "Per block, the share of tokens whose top-1 class at the block's output equals that "
            "of the block's input, of the attention output, of the MLP output, or none of them "
            "(the official code checks the attention twice for 'none'; official=True does).",
            "",
            cost=1.5,
        ),
        AnalysisSpec(
            "context_identifiability",
            _with_baseline(context_identifiability),
            "Object vs context image tokens (object: at least half the patch inside the mask, or "
            "the official nearest-pixel rule): identifiability per block with a seeded "
            "permutation test of the difference, and the attention sublayer's label-logit "
            "change split by object and context.",
            "ViT-B/32: the attention raises the label logit of more object than context tokens "
            "in blocks 1-7 (p = 0, 300 permutations), fewer in blocks 8-10 (notebook 2, "
            "compute_context_diff).",
            needs_masks=True,
            cost=3.0,
        ),
        AnalysisSpec(
            "context_removal",
            _without_baseline(context_removal),
            "Object or context tokens removed right after the position embedding ([CLS] kept): "
            "identifiability of the remaining tokens in the last block against the same tokens "
            "unperturbed, and the accuracy of each run.",
            "ViT-B/32, last block: object tokens 71.92 % identifiable, 44.70 % without the "
            "context; context tokens 56.24 %, 38.68 % without the object (notebook 1).",
            needs_masks=True,
            cost=5.0,
        ),
        AnalysisSpec(
            "attention_knockout",
            _without_baseline(attention_knockout),
            "Identifiability of the image tokens per block with the attention of every block "
            "edited as the official vit_edited.py: 'self_only' (each image token attends only "
            "to itself) and 'no_cls' (image tokens' attention to [CLS] zeroed, rows not "
            "renormalised), next to the unperturbed model, with the top-1 accuracy of each run "
            "and a paired Wilcoxon test per block against the unperturbed run.",
            "ViT-B/32, last block: 60.73 % of image tokens identifiable unperturbed, 0.126 % "
            "self_only, 60.71 % no_cls (notebook 1).",
            cost=3.0,
        ),
        AnalysisSpec(
            "patching",
            _patching,
            f"Activation patching of the first {PATCHING_PAIRS} images, each (clean) paired "
            "with the next image of another label (corrupted): the share of the clean label's "
            "logit difference restored by copying the clean residual stream at one block and "
            "token, or one head's output at one block, into the corrupted run.",
            "",
            cost=10.0,
        ),
        AnalysisSpec(
            "value_vectors",
            _value_vectors,
            "Value vectors (columns of each block's second MLP linear and attention output "
            "projection, times layer scale) against the class embeddings (head rows through "
            "the final norm's scale), unit-normed: per block the best-matching memory of each "
            "class and their mean (class-value agreement), against the untrained baseline with "
            "a one-sided Wilcoxon test paired by class.",
            "Class-value agreement rises along the blocks above that of random-weight models "
            "(notebook 2, plot_categorical_updates).",
            cost=0.0,
        ),
        AnalysisSpec(
            "key_value_agreement",
            _without_baseline(key_value_agreement),
            "Per token, its 5 most activated memories (MLP: first linear before the "
            "activation; attention: per-head softmax(QK^T)V) agree when one of them is among "
            "the label's top-5 memories: the rate per block against a random-class control, "
            "[CLS] agreement on correctly vs wrongly classified images, and the share of tokens "
            "whose sublayer top-1 class is that of one of its top memories (compositionality).",
            "Key-value agreement above the random-class control, higher on correctly "
            "classified images (notebook 2, plot_key_value_agreement_rate, plot_agr_rate_diff).",
            cost=1.0,
        ),
        AnalysisSpec(
            "linear_probes",
            _linear_probes,
            "Ridge probes (±1 one-vs-rest targets, alpha 1) per block, component and token "
            "position, fitted on held-out training images and scored top-1 on these images, "
            "beside the class-space projection's top-1 on the same tokens; and the probes' "
            "top-1 as a function of the training images per class.",
            "The class-embedding map removes tokens more faithfully than a probe map "
            "(token-removal AUC negative 0.836 vs 0.739, positive 0.413 vs 0.683; notebook 4).",
            cost=2.0,
            requires=("train",),
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
            the result's ``to_dict()``; ``table``: its markdown; ``seconds``: how long it
            ran).
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
        missing = [key for key in spec.requires if key not in options.get(name, {})]
        if missing:
            report.skipped[name] = f"needs {', '.join(missing)} (pass options={{{name!r}: ...}})"
            continue
        if progress is not False:
            print(f"analysis: {name}", file=sys.stderr)
        start = time.perf_counter()
        try:
            result = spec.run(model, data, baseline, **common, **options.get(name, {}))
        except UnsupportedModelError as error:
            report.skipped[name] = str(error)
            continue
        seconds = round(time.perf_counter() - start, 1)
        report.results[name] = result
        _save_figure(result, out / f"{name}.png")
        stored[name] = {"result": result.to_dict(), "table": result.table(), "seconds": seconds}
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
