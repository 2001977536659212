"""Run the paper's experiments on its models, step by step, resumable.

Per model (:func:`reproduce`): load it with the official preprocessing, open its stimuli
(ImageNet-S validation with object masks, or CIFAR-100 test), build its untrained twin, run
every analysis of :data:`~class_space_saliency.analysis.ANALYSES` into
``OUT/<model>/analyses/``, the token-removal benchmark with the paper's map, Chefer's and a
random map into ``OUT/<model>/vilas2023/``, and the notebook's value-vector classes; then write
``OUT/report.md`` and ``OUT/report.json`` with our numbers beside the paper's.

Each finished step is recorded in ``OUT/<model>/steps.json`` (atomically), and the analyses
and the benchmark keep their own partial progress, so an interrupted run (Ctrl-C, a lost
machine) continues where it stopped when the same command runs again; a model whose steps are
all done is not even loaded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._fingerprint import model_fingerprint
from ..adapters import UnsupportedModelError
from ..analysis import run_analyses
from ..anatomy import ViTAnatomy
from ..classes import imagenet_class_names
from ..datasets import CIFAR100, ImageNetS
from ..evaluation import resolve_protocols, run_benchmark, write_report
from ..methods import create_method
from ..models import load_paper_model
from ..paper import PaperModel, paper_results
from ..preprocessing import Preprocessing
from ..untrained import untrained_copy
from .plan import (
    BENCHMARK_METHODS,
    PROBE_ANALYSIS,
    PROBE_IMAGES_PER_CLASS,
    STEPS,
    STIMULI_PER_CLASS,
    ModelPlan,
    official_random_orders,
    plan_reproduction,
    stimuli_list,
)
from .report import ReproductionReport, write_reproduction_report

ModelFactory = Callable[[PaperModel, str | None], tuple[nn.Module, Preprocessing]]
"""``factory(paper model, checkpoint file or None) -> (model, preprocessing)``."""

TOKEN_RULE = "nearest"
"""How object masks label tokens: the official rule (the mask at each patch's top-left pixel,
``cv2.INTER_NEAREST`` of the annotation onto the grid)."""

ANALYSIS_OPTIONS: dict[str, dict[str, Any]] = {
    "context_identifiability": {"rule": TOKEN_RULE, "official": True},
    "context_removal": {"rule": TOKEN_RULE},
}
"""Options ``reproduce`` passes to analyses (where :data:`ANALYSES` has them): the official
token rule, and the official statistic of the attention change (the paper's table)."""

PAPER_MAP = "class_space_gradient_paper"
"""The paper's map, the reference of the benchmark's paired comparisons."""

VALUE_VECTOR_TOP = 5
"""Classes per memory the official notebook prints."""


def paper_model_factory(
    spec: PaperModel, checkpoint: str | None
) -> tuple[nn.Module, Preprocessing]:
    """The default factory: :func:`~class_space_saliency.models.load_paper_model`."""
    return load_paper_model(spec, checkpoint)


def reproduce(
    out_dir: str | Path,
    *,
    imagenet_s: str | Path | None = None,
    cifar100: str | Path | None = None,
    models: Sequence[str] | None = None,
    checkpoints: Mapping[str, str | Path | None] | None = None,
    analyses: Sequence[str] | None = None,
    steps: Sequence[str] = STEPS,
    stimuli: str = "auto",
    probe_split: str = "test",
    num_images: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    workers: int = 0,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool | None = None,
    model_factory: ModelFactory | None = None,
) -> ReproductionReport:
    """Run the paper's analyses and token-removal test on its models; write one report.

    Args:
        out_dir: Output folder (resumable: the same call continues an interrupted run).
        imagenet_s: ImageNet-S root (``ImageNetS919`` or the folder holding it).
        cifar100: CIFAR-100 root (torchvision's layout), for ``vit_cifar_16``.
        models: Keys of :data:`~class_space_saliency.paper.PAPER_MODELS` (default: all seven).
        checkpoints: ``{"vit_cifar_16": file, "deit_ensemble_16": file}``: the checkpoints
            outside timm (the Refinement model downloads the official one without it).
        analyses: Names of :data:`~class_space_saliency.analysis.ANALYSES` (default: all).
        steps: Steps of :data:`~class_space_saliency.reproduce.STEPS`.
        stimuli: ``"auto"``, ``"paper"`` or ``"rule"`` (see
            :func:`~class_space_saliency.reproduce.plan_reproduction`).
        probe_split: ImageNet-S split the probes are fitted on (official: ``"test"``).
        num_images: Use the first ``num_images`` stimuli only (a quick look; the paper's
            numbers need all).
        device: Where to run (default: CUDA when available).
        batch_size: Images per forward pass.
        workers: Data-loading processes of the analyses.
        seed: Seed of the untrained twins, the random maps and the bootstrap.
        n_boot: Bootstrap resamples of the benchmark's intervals.
        progress: Progress bars (``None``: on a terminal); step lines go to stderr always.
        model_factory: Builds each model (default :func:`paper_model_factory`). The test hook:
            a factory of tiny random-init models runs the whole pipeline offline.

    Returns:
        The :class:`~class_space_saliency.reproduce.ReproductionReport` (``OUT/report.md``,
        ``OUT/report.json``).

    Raises:
        ValueError: For bad arguments, or an output folder holding another configuration.
        KeyboardInterrupt: Passed on; finished steps are kept.

    Example:
        >>> report = reproduce("out", imagenet_s="ImageNet-S")  # doctest: +SKIP
    """
    plan = plan_reproduction(
        out_dir,
        imagenet_s=imagenet_s,
        cifar100=cifar100,
        models=models,
        checkpoints=checkpoints,
        analyses=analyses,
        steps=steps,
        stimuli=stimuli,
        probe_split=probe_split,
        num_images=num_images,
    )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    run = _Run(
        out=Path(out_dir),
        imagenet_s=None if imagenet_s is None else Path(imagenet_s),
        cifar100=None if cifar100 is None else Path(cifar100),
        stimuli=stimuli,
        probe_split=probe_split,
        num_images=num_images,
        device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        batch_size=batch_size,
        workers=workers,
        seed=seed,
        n_boot=n_boot,
        progress=progress,
        factory=model_factory or paper_model_factory,
    )
    run.out.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    try:
        for number, model_plan in enumerate(plan.models, start=1):
            prefix = f"[{number}/{len(plan.models)}] {model_plan.model.key}"
            reason = _run_model(model_plan, run, prefix)
            if reason:
                failures[model_plan.model.key] = reason
    except KeyboardInterrupt:
        write_reproduction_report(run.out, plan, failures)  # what finished so far
        raise
    report = write_reproduction_report(run.out, plan, failures)
    _log(f"wrote {report.files[0]} and {report.files[1]}")
    return report


@dataclass
class _Run:
    """The settings every model of one ``reproduce`` call shares."""

    out: Path
    imagenet_s: Path | None
    cifar100: Path | None
    stimuli: str
    probe_split: str
    num_images: int | None
    device: torch.device
    batch_size: int
    workers: int
    seed: int
    n_boot: int
    progress: bool | None
    factory: ModelFactory


@dataclass
class _Loaded:
    """One model in memory with its data, for its steps."""

    plan: ModelPlan
    model: nn.Module
    preprocessing: Preprocessing
    data: Dataset
    probe_data: Dataset | None
    folder: Path
    twin: nn.Module | None = field(default=None)

    def untrained_twin(self, seed: int) -> nn.Module:
        """The untrained twin, built on first use."""
        if self.twin is None:
            self.twin = untrained_copy(self.model, seed=seed).eval()
        return self.twin


class StepLedger:
    """``OUT/<model>/steps.json``: the status of every step of one model, written atomically.

    Statuses: ``"done"``, ``"skipped"`` (not applicable to this model or data: final) and
    ``"failed"`` (run again next time).

    Args:
        path: The JSON file.
        config: What identifies the model's run; a file of another configuration raises.

    Raises:
        ValueError: If ``path`` records another configuration.
    """

    FINAL = ("done", "skipped")

    def __init__(self, path: Path, config: dict) -> None:
        self.path = path
        self.config = config
        self.steps: dict[str, dict] = {}
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("config") != config:
                raise ValueError(
                    f"{path.parent} holds a run of another configuration "
                    f"({stored.get('config')}); choose another output folder or delete it"
                )
            self.steps = stored.get("steps", {})

    def finished(self, step: str) -> bool:
        """Whether ``step`` needs no further run."""
        return self.steps.get(step, {}).get("status") in self.FINAL

    def record(self, step: str, status: str, reason: str = "", seconds: float = 0.0) -> None:
        """Record a step's outcome and rewrite the file."""
        self.steps[step] = {"status": status, "reason": reason, "seconds": round(seconds, 1)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"config": self.config, "steps": self.steps}, indent=1))
        os.replace(partial, self.path)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_model(plan: ModelPlan, run: _Run, prefix: str) -> str:
    """Run the model's unfinished steps; returns why it could not run (``""`` if it ran)."""
    for step, reason in plan.not_run.items():
        _log(f"{prefix}: {'' if step == 'model' else step + ' '}not run: {reason}")
    if not plan.runs:
        return ""
    folder = run.out / plan.model.key
    config = {
        "model": plan.model.key,
        "weights": plan.weights,
        "data": plan.data.description,
        "probe_data": plan.data.probe_description,
        "num_images": run.num_images,
        "seed": run.seed,
    }
    ledger = StepLedger(folder / "steps.json", config)
    todo = [step for step in plan.steps if not ledger.finished(step)]
    if not todo:
        _log(f"{prefix}: every step done")
        return ""
    _log(f"{prefix}: loading {plan.model.name}, {plan.weights}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model, preprocessing = run.factory(plan.model, plan.weights_file)
        loaded = _load_data(plan, model.to(run.device).eval(), preprocessing, run, folder, todo)
    except (TypeError, ValueError, RuntimeError, OSError) as error:
        _log(f"{prefix}: failed to load: {error}")
        return f"could not be loaded: {error}"
    for step in todo:
        _log(f"{prefix}: {step}")
        start = time.perf_counter()
        try:
            status, reason = _run_step(step, loaded, run)
        except (TypeError, ValueError, RuntimeError) as error:  # UnsupportedModelError too
            status, reason = "failed", f"{type(error).__name__}: {error}"
        seconds = time.perf_counter() - start
        ledger.record(step, status, reason, seconds)
        outcome = status if not reason else f"{status}: {reason}"
        _log(f"{prefix}: {step} {outcome} ({seconds:.0f} s)")
    return ""


def _load_data(
    plan: ModelPlan,
    model: nn.Module,
    preprocessing: Preprocessing,
    run: _Run,
    folder: Path,
    todo: list[str],
) -> _Loaded:
    probes = f"analyses/{PROBE_ANALYSIS}" in todo
    if plan.data.name == "cifar100":
        data = CIFAR100(run.cifar100, preprocessing, per_class=STIMULI_PER_CLASS)
        probe_data = (
            CIFAR100(run.cifar100, preprocessing, split="train", per_class=PROBE_IMAGES_PER_CLASS)
            if probes
            else None
        )
    else:
        data = ImageNetS(
            run.imagenet_s,
            preprocessing,
            stimuli=stimuli_list(run.imagenet_s, "validation", run.stimuli),
            per_class=STIMULI_PER_CLASS,
            masks=True,
        )
        probe_data = (
            ImageNetS(
                run.imagenet_s,
                preprocessing,
                split=run.probe_split,
                stimuli=stimuli_list(run.imagenet_s, run.probe_split, run.stimuli),
                per_class=PROBE_IMAGES_PER_CLASS,
                masks=False,
            )
            if probes
            else None
        )
    return _Loaded(plan, model, preprocessing, data, probe_data, folder)


def _run_step(step: str, loaded: _Loaded, run: _Run) -> tuple[str, str]:
    """Run one step; returns ``(status, reason)``."""
    if step.startswith("analyses/"):
        return _run_analysis(step.partition("/")[2], loaded, run)
    if step == "vilas2023":
        return _run_vilas2023(loaded, run)
    if step == "value_vector_classes":
        return _run_value_vector_classes(loaded, run)
    raise ValueError(f"unknown step {step!r}")


def _loader(data: Dataset, run: _Run) -> DataLoader:
    return DataLoader(data, batch_size=run.batch_size, num_workers=run.workers)


def analysis_options(name: str, model_key: str, probe_data: Any) -> dict[str, Any]:
    """Options ``reproduce`` passes to the analysis ``name`` of ``model_key``.

    :data:`ANALYSIS_OPTIONS`, and for the probes their training data (``train``) and token
    positions: every position for ViT-B/32 (the only model the official prober fitted; its
    normal equations take about 9 GB), pooled for the others (196 positions would take four
    times as much).
    """
    options = dict(ANALYSIS_OPTIONS.get(name, {}))
    if name == PROBE_ANALYSIS:
        options.update(train=probe_data, positions="all" if model_key == "vit_b_32" else "pooled")
    return options


def _run_analysis(name: str, loaded: _Loaded, run: _Run) -> tuple[str, str]:
    plan = loaded.plan
    probe_data = None if loaded.probe_data is None else _loader(loaded.probe_data, run)
    report = run_analyses(
        loaded.model,
        _loader(loaded.data, run),
        loaded.folder / "analyses",
        analyses=[name],
        baseline=loaded.untrained_twin(run.seed),
        has_masks=loaded.data.has_masks,
        num_images=run.num_images,
        batch_size=run.batch_size,
        progress=run.progress,
        config={
            "model": plan.model.key,
            "weights": plan.weights,
            "fingerprint": model_fingerprint(loaded.model),
            "data": plan.data.description,
            "probe_data": plan.data.probe_description,
            "token_rule": TOKEN_RULE,
            "seed": run.seed,
        },
        options={name: analysis_options(name, plan.model.key, probe_data)},
    )
    if name in report.skipped:
        return "skipped", report.skipped[name]
    return "done", ""


def _run_vilas2023(loaded: _Loaded, run: _Run) -> tuple[str, str]:
    folder = loaded.folder / "vilas2023"
    methods, not_applicable = {}, {}
    for name in BENCHMARK_METHODS:
        try:
            methods[name] = create_method(name, loaded.model)
        except UnsupportedModelError as error:
            not_applicable[name] = str(error)
    protocols = resolve_protocols(["vilas2023"])
    orders = official_random_orders(loaded.plan.model.key)
    if orders:
        protocols = [replace(protocol, shared_random_orders=orders) for protocol in protocols]
    report = run_benchmark(
        loaded.model,
        loaded.data,
        methods,
        protocols,
        loaded.preprocessing.mean,
        loaded.preprocessing.std,
        folder,
        batch_size=run.batch_size,
        n=run.num_images,
        seed=run.seed,
        progress=run.progress is not False,
        model_name=loaded.plan.model.key,
        n_boot=run.n_boot,
    )
    if PAPER_MAP in methods:
        report = write_report(folder, reference=PAPER_MAP, n_boot=run.n_boot)
    auc: dict[str, dict[str, dict]] = {}
    for row in report.rows:
        auc.setdefault(row.protocol, {})[row.method] = {
            "auc": row.auc,
            "low": row.auc_low,
            "high": row.auc_high,
            "diff_vs_paper_map": row.diff,
            "diff_low": row.diff_low,
            "diff_high": row.diff_high,
        }
    summary = {
        "clean_accuracy_percent": 100 * report.clean_accuracy,
        "n_images": report.n_images,
        "random_orders": orders,
        "auc": auc,
        "not_applicable": not_applicable,
        "figures": sorted(path.name for path in report.files if path.suffix == ".png"),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not_applicable:
        return "done", "not applicable: " + "; ".join(
            f"{name} ({reason})" for name, reason in not_applicable.items()
        )
    return "done", ""


def memory_classes(
    model: nn.Module, block: int, memory: int, k: int, allowed: set[int] | None = None
) -> list[int]:
    """The ``k`` classes of largest dot product with an MLP memory's value vector.

    The official notebook's ``(model.head.weight @ model.blocks[block].mlp.fc2.weight)[:,
    memory].topk(k)``, with classes outside ``allowed`` (the stimuli's) dropped from those
    ``k`` as its printout drops them.

    Args:
        model: A timm ViT (its anatomy's linear head and ``blocks[block].mlp.fc2``).
        block: Block index.
        memory: Column of the second MLP linear (the memory).
        k: Classes ranked.
        allowed: Classes kept (``None``: all).

    Returns:
        Class indices, best first.

    Raises:
        UnsupportedModelError: For a model without a linear head or ``mlp.fc2``.
    """
    anatomy = ViTAnatomy.from_model(model)
    head = anatomy.linear_head()
    fc2 = getattr(getattr(anatomy.blocks[block], "mlp", None), "fc2", None)
    if head is None or not isinstance(fc2, nn.Linear):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no linear head or no blocks[{block}].mlp.fc2 to read "
            "value vectors from"
        )
    with torch.no_grad():
        scores = head[0].float() @ fc2.weight[:, memory].float()
    top = scores.topk(k).indices.tolist()
    return [c for c in top if allowed is None or c in allowed]


def _run_value_vector_classes(loaded: _Loaded, run: _Run) -> tuple[str, str]:
    labels = loaded.data.labels
    allowed = set(labels if run.num_images is None else labels[: run.num_images])
    names = loaded.preprocessing.class_names or imagenet_class_names()
    found = {}
    for entry in paper_results(loaded.plan.model.key, "value_vector_classes"):
        block, memory = (int(part) for part in entry.quantity.split("/"))
        classes = memory_classes(loaded.model, block, memory, VALUE_VECTOR_TOP, allowed)
        found[entry.quantity] = [names[c] for c in classes]
    path = loaded.folder / "value_vector_classes.json"
    path.write_text(json.dumps(found, indent=1) + "\n")
    return "done", ""
