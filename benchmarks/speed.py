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

Times are medians of the timed calls after a warm-up. Peak memory is measured above a
baseline taken after the model is loaded: on the CPU each (model, batch size, measurement)
runs in a fresh process forked from a clean ``forkserver`` process (which has only imported
the libraries), and its ``ru_maxrss`` grows by that much during its first call, which is also
its warm-up (so one-time costs, library code paged in and lazy initialisation, ~10-30 MiB,
are included: memory ratios mean little where activations are small); on the GPU it is
``torch.cuda.max_memory_allocated`` of one call above the memory allocated before it.
Every figure is also given as a ratio to the plain forward of the same model, device, dtype
and batch size, and the issue's targets are marked met/missed.

Writes ``benchmarks/results/speed.json`` (``--out``) and a Markdown table next to it
(``speed.md``), and prints the table.

Example:
    python benchmarks/speed.py                      # full run, all cores (~8-9 min, 2 cores)
    python benchmarks/speed.py --quick --threads 1  # smoke run: embedded model, seconds
    python benchmarks/speed.py --only-imputer       # the imputer row alone (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import multiprocessing
import operator
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import captum
import timm
import torch
from captum.attr import LayerGradCam
from torch import nn
from tqdm.auto import tqdm

from class_space_saliency import ClassSpaceSaliency
from class_space_saliency.data import load_default_eval
from class_space_saliency.evaluation import (
    PRESETS,
    Protocol,
    noisy_linear_impute,
    perturbation_curves,
)
from class_space_saliency.methods import METHODS, create_method, list_methods
from class_space_saliency.models import load_default

MODELS = ("default", "vit_base_patch16_224")
"""``default``: the embedded Fashion-MNIST ViT; any other name: a random-init timm model."""

BATCH_SIZES = (1, 8, 32)
CURVE_IMAGES = 32
"""Images per timed call of the perturbation curves: the benchmark runner's batch size
(token removal runs one forward pass per kept length, so it pays off on many images)."""
CPU_CURVE_MODELS = ("default",)
"""Models whose perturbation curves are timed on the CPU (every model's on the GPU)."""

CAPTUM = "captum_layergradcam"
VARIANTS: dict[str, tuple[str, dict]] = {
    "class_space": ("class_space", {"layer": -1}),
    "class_space_all": ("class_space", {"layer": "all"}),
}
"""Measured class-space configurations: name -> (registry name, constructor options)."""

MEASUREMENTS = (
    "forward",
    *VARIANTS,
    *(name for name in METHODS if name != "class_space"),
    CAPTUM,
)
NEEDS_GRAD = frozenset({*list_methods(needs_gradients=True), CAPTUM})
"""Measurements that take gradients; every other one runs under ``torch.no_grad()``."""

DTYPES = ("fp32", "bf16")
"""GPU precisions: plain fp32, and bf16 autocast."""

PIXEL_STEPS = "vilas2023 as pixel steps"
"""vilas2023's curves with pixel deletion (black) at the same steps, for the cost ratio."""

PRELOAD = (
    "torch",
    "timm",
    "captum.attr",
    "tqdm.auto",
    "class_space_saliency",
    "class_space_saliency.data",
    "class_space_saliency.evaluation",
    "class_space_saliency.models",
)
"""Modules the forkserver imports once, so that each measurement's process starts in
milliseconds (it still re-runs this script's top level, which then only defines things)."""


@dataclass(frozen=True)
class Repeats:
    """How many timed calls follow the warm-up: fixed, or as many as fit a time budget.

    The default budget keeps the full CPU run under 10 minutes on 2 cores: calls longer
    than the budget (ViT-B/16 at batch 8 or 32) are timed once after their warm-up.

    Attributes:
        fixed: Exactly this many timed calls, or ``None`` to use the budget.
        budget_s: Seconds of timed calls to aim for, estimated from the warm-up call.
        least: Fewest timed calls under the budget rule.
        most: Most timed calls under the budget rule.

    Example:
        >>> Repeats(budget_s=3.0).count(1.4)
        3
    """

    fixed: int | None = None
    budget_s: float = 3.0
    least: int = 1
    most: int = 20

    def count(self, estimate_s: float) -> int:
        """Timed calls for a call that took ``estimate_s`` seconds in the warm-up."""
        if self.fixed is not None:
            return self.fixed
        wanted = math.ceil(self.budget_s / max(estimate_s, 1e-6))
        return max(self.least, min(self.most, wanted))


@dataclass
class Workload:
    """A model in eval mode with its inputs, targets and normalisation."""

    model: nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to(self, device: str | torch.device) -> Workload:
        """The same workload on ``device`` (the model is moved in place)."""
        return dataclasses.replace(
            self,
            model=self.model.to(device),
            images=self.images.to(device),
            targets=self.targets.to(device),
        )


@dataclass
class Measurement:
    """Timed calls and peak memory of one measurement in one configuration.

    Attributes:
        model: Model name.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"fp32"`` or ``"bf16"`` (autocast).
        batch_size: Images per call.
        name: One of :data:`MEASUREMENTS`.
        times_s: Wall time of each timed call.
        peak_bytes: Peak memory above the post-load baseline.
        spearman_vs_fp32: For bf16: ``{"min", "median"}`` of the per-image Spearman
            correlation of the outputs with fp32's (``None`` where undefined).
    """

    model: str
    device: str
    dtype: str
    batch_size: int
    name: str
    times_s: list[float]
    peak_bytes: int
    spearman_vs_fp32: dict[str, float | None] | None = None

    @property
    def median_s(self) -> float:
        """Median wall time of the timed calls."""
        return statistics.median(self.times_s)

    @property
    def group(self) -> tuple[str, str, str, int]:
        """The configuration whose forward this is compared with."""
        return (self.model, self.device, self.dtype, self.batch_size)


@dataclass
class CurveTiming:
    """Time of one preset's perturbation curves on a batch of images.

    Attributes:
        model: Model name.
        device: ``"cpu"`` or ``"cuda"``.
        name: Preset name, or :data:`PIXEL_STEPS`.
        images: Images per call.
        forwards_per_image: Perturbed inputs per image over the preset's curves.
        times_s: Wall time of each timed call (all images, all curves of the preset).
    """

    model: str
    device: str
    name: str
    images: int
    forwards_per_image: int
    times_s: list[float]

    @property
    def per_image_s(self) -> float:
        """Median time per image."""
        return statistics.median(self.times_s) / self.images


# ---------------------------------------------------------------------------- workloads
def load_workload(name: str, count: int) -> Workload:
    """The model ``name`` with ``count`` inputs and targets.

    Args:
        name: ``"default"`` (the embedded model on the first ``count`` images of its
            evaluation subset, with their labels) or a timm model name (random weights,
            standard-normal inputs of its input size, random targets; seeded).
        count: Number of inputs (the largest batch size).

    Returns:
        The workload, on the CPU.

    Example:
        >>> load_workload("default", 8).images.shape
        torch.Size([8, 3, 28, 28])
    """
    torch.manual_seed(0)
    if name == "default":
        model, preprocessing = load_default()
        images, labels = load_default_eval(count, preprocessing=preprocessing)
        return Workload(model, images, labels, preprocessing.mean, preprocessing.std)
    model = timm.create_model(name, pretrained=False).eval()
    config = timm.data.resolve_data_config({}, model=model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, *config["input_size"], generator=generator)
    targets = torch.randint(model.num_classes, (count,), generator=generator)
    return Workload(model, images, targets, tuple(config["mean"]), tuple(config["std"]))


def make_call(
    name: str,
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    dtype: str = "fp32",
) -> Callable[[], torch.Tensor]:
    """A no-argument call that runs one measurement on one batch.

    Args:
        name: One of :data:`MEASUREMENTS`.
        model: The model (eval mode).
        images: The batch.
        targets: Class per image (ignored by ``forward``).
        dtype: ``"fp32"``, or ``"bf16"`` to run under autocast on the images' device.

    Returns:
        The call; it returns the logits or maps.

    Example:
        >>> maps = make_call("class_space_all", model, images, labels)()
    """
    if name == "forward":
        run = functools.partial(model, images)
    elif name == CAPTUM:
        layer = create_method("gradcam", model).layer
        run = functools.partial(LayerGradCam(model, layer).attribute, images, target=targets)
    else:
        method, options = VARIANTS.get(name, (name, {}))
        explainer = create_method(method, model, **options)
        run = functools.partial(explainer.attribute, images, target=targets)

    def call() -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            if name not in NEEDS_GRAD:
                stack.enter_context(torch.no_grad())
            if dtype == "bf16":
                stack.enter_context(torch.autocast(images.device.type, dtype=torch.bfloat16))
            return run()

    return call


# ---------------------------------------------------------------------------- timing, memory
def timed(
    call: Callable[[], torch.Tensor], synchronize: Callable[[], None] | None = None
) -> tuple[float, torch.Tensor]:
    """Run ``call`` once.

    Args:
        call: The call.
        synchronize: Waits for queued device work (``torch.cuda.synchronize``), or ``None``.

    Returns:
        ``(wall seconds, the call's output)``.

    Example:
        >>> seconds, logits = timed(lambda: model(images))
    """
    start = time.perf_counter()
    output = call()
    if synchronize is not None:
        synchronize()
    return time.perf_counter() - start, output


def time_calls(
    call: Callable[[], torch.Tensor],
    repeats: Repeats,
    synchronize: Callable[[], None] | None = None,
) -> tuple[list[float], torch.Tensor]:
    """Time ``call`` in this process: a warm-up call, then the timed ones.

    Args:
        call: The call.
        repeats: How many timed calls (estimated from the warm-up call).
        synchronize: See :func:`timed`.

    Returns:
        ``(seconds of each timed call, the last output)``.

    Example:
        >>> times, _ = time_calls(lambda: model(images), Repeats(fixed=5))
    """
    estimate, output = timed(call, synchronize)  # also lazy initialisation
    times = []
    for _ in range(repeats.count(estimate)):
        elapsed, output = timed(call, synchronize)
        times.append(elapsed)
    return times, output


def gpu_peak_bytes(
    call: Callable[[], torch.Tensor], device: torch.device
) -> tuple[int, torch.Tensor]:
    """CUDA memory one call allocates at its peak, above what was allocated before it.

    Args:
        call: The call (warmed up).
        device: The CUDA device.

    Returns:
        ``(peak bytes, the call's output)``.

    Example:
        >>> peak, _ = gpu_peak_bytes(lambda: model(images), torch.device("cuda"))
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    output = call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, output


def max_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_in_child(
    bundle: str, name: str, batch_size: int, threads: int, repeats: Repeats
) -> tuple[list[float], int]:
    """Run in a fresh process: peak memory of the first call, then time the calls.

    Args:
        bundle: A ``torch.save``-d dict with the workload's ``model``, ``images`` and
            ``targets``.
        name: One of :data:`MEASUREMENTS`.
        batch_size: Images per call (the first ``batch_size`` of the bundle).
        threads: Torch CPU threads.
        repeats: Timed calls after the first (estimated from the first).

    Returns:
        ``(seconds of each timed call, peak bytes of the first call above the baseline)``.

    Example:
        >>> times, peak = measure_in_child("workload.pt", "forward", 8, 2, Repeats())
    """
    torch.set_num_threads(threads)
    work = torch.load(bundle, weights_only=False)
    call = make_call(name, work["model"], work["images"][:batch_size], work["targets"][:batch_size])
    gc.collect()
    baseline = max_rss_bytes()
    first, _ = timed(call)
    peak = max_rss_bytes() - baseline
    return [timed(call)[0] for _ in range(repeats.count(first))], peak


def _send_result(connection: Connection, function: Callable, args: tuple) -> None:
    """Child side of :func:`run_in_fresh_process`: send the result or the traceback."""
    try:
        result = function(*args)
    except BaseException:  # reported to the parent, which raises it
        connection.send((False, traceback.format_exc()))
    else:
        connection.send((True, result))
    connection.close()


def run_in_fresh_process(
    context: multiprocessing.context.BaseContext, function: Callable, args: tuple
) -> object:
    """``function(*args)`` in a new process of ``context``; its result, or its error raised.

    Args:
        context: A multiprocessing context (``forkserver`` here).
        function: A module-level function (picklable by reference).
        args: Its picklable arguments.

    Returns:
        What ``function`` returned.

    Raises:
        RuntimeError: With the child's traceback if it raised, or if it died without an
            answer (e.g. killed for memory).

    Example:
        >>> run_in_fresh_process(multiprocessing.get_context("spawn"), max, (1, 2))
        2
    """
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_send_result, args=(sender, function, args))
    process.start()
    sender.close()  # the child holds the only sending end: EOF once it is gone
    try:
        ok, result = receiver.recv()
    except EOFError:
        ok, result = False, "the process died without an answer"
    finally:
        process.join()
        receiver.close()
    if not ok:
        raise RuntimeError(
            f"{function.__name__}{args} failed (exit code {process.exitcode}):\n{result}"
        )
    return result


# ---------------------------------------------------------------------------- bf16 agreement
def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1 … n of a 1-D tensor; tied values share their average rank."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman_per_image(first: torch.Tensor, second: torch.Tensor) -> list[float]:
    """Spearman rank correlation of two outputs, per image (NaN for a constant output).

    Args:
        first: (B, ...) maps or logits.
        second: The same shape.

    Returns:
        B correlations.

    Example:
        >>> spearman_per_image(torch.tensor([[1.0, 2, 3]]), torch.tensor([[1.0, 5, 9]]))
        [1.0]
    """
    correlations = []
    for x, y in zip(first.flatten(1).cpu(), second.flatten(1).cpu(), strict=True):
        rank_x, rank_y = _average_ranks(x.double()), _average_ranks(y.double())
        rank_x, rank_y = rank_x - rank_x.mean(), rank_y - rank_y.mean()
        scale = float(rank_x.norm() * rank_y.norm())
        correlations.append(float(rank_x @ rank_y) / scale if scale > 0 else math.nan)
    return correlations


def _min_and_median(values: Sequence[float]) -> dict[str, float | None]:
    """``{"min", "median"}`` over the defined (non-NaN) values, ``None`` if there are none."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return {"min": None, "median": None}
    return {"min": min(defined), "median": statistics.median(defined)}


# ---------------------------------------------------------------------------- runs
def cpu_measurements(
    context: multiprocessing.context.BaseContext,
    bundle: Path,
    model: str,
    batch_sizes: Sequence[int],
    threads: int,
    repeats: Repeats,
    bar: tqdm,
) -> list[Measurement]:
    """Every measurement at every batch size, each in a fresh process of ``context``.

    Args:
        context: The multiprocessing context that starts the processes.
        bundle: The saved workload (see :func:`measure_in_child`).
        model: Model name, for the records.
        batch_sizes: Batch sizes to measure.
        threads: Torch CPU threads.
        repeats: Timed calls after the warm-up.
        bar: Progress bar, advanced once per measurement.

    Returns:
        The measurements.

    Example:
        >>> context = multiprocessing.get_context("forkserver")
        >>> rows = cpu_measurements(context, Path("w.pt"), "default", [1], 2, Repeats(), tqdm())
    """
    results = []
    for batch_size in batch_sizes:
        for name in MEASUREMENTS:
            bar.set_postfix_str(f"{model} cpu b={batch_size} {name}")
            times, peak = run_in_fresh_process(
                context, measure_in_child, (str(bundle), name, batch_size, threads, repeats)
            )
            results.append(Measurement(model, "cpu", "fp32", batch_size, name, times, peak))
            bar.update()
    return results


def gpu_measurements(
    work: Workload, model: str, batch_sizes: Sequence[int], repeats: Repeats, bar: tqdm
) -> list[Measurement]:
    """Every measurement at every batch size in fp32 and bf16 autocast, in this process.

    bf16 records carry the per-image Spearman correlation of their output with fp32's.

    Args:
        work: The workload on a CUDA device.
        model: Model name, for the records.
        batch_sizes: Batch sizes to measure.
        repeats: Timed calls after the warm-up.
        bar: Progress bar, advanced once per measurement and dtype.

    Returns:
        The measurements.

    Example:
        >>> rows = gpu_measurements(work.to("cuda"), "default", [8], Repeats(), tqdm())
    """
    device = work.images.device
    synchronize = functools.partial(torch.cuda.synchronize, device)
    results = []
    for batch_size in batch_sizes:
        images, targets = work.images[:batch_size], work.targets[:batch_size]
        for name in MEASUREMENTS:
            outputs = {}
            for dtype in DTYPES:
                bar.set_postfix_str(f"{model} cuda {dtype} b={batch_size} {name}")
                call = make_call(name, work.model, images, targets, dtype)
                times, _ = time_calls(call, repeats, synchronize)
                peak, outputs[dtype] = gpu_peak_bytes(call, device)
                results.append(Measurement(model, "cuda", dtype, batch_size, name, times, peak))
                bar.update()
            agreement = spearman_per_image(outputs["fp32"].float(), outputs["bf16"].float())
            results[-1].spearman_vs_fp32 = _min_and_median(agreement)
    return results


def as_pixel_steps(protocol: Protocol, num_tokens: int) -> Protocol:
    """A token-removal protocol redone with black pixel deletion at the same step count.

    Args:
        protocol: A token protocol with ``steps=None`` (every count 1 … N-1).
        num_tokens: Image tokens N of the model's input.

    Returns:
        The pixel protocol with the N-1 fractions ``k / N``.

    Example:
        >>> as_pixel_steps(PRESETS["vilas2023"][0], 4).steps
        (0.25, 0.5, 0.75)
    """
    return dataclasses.replace(
        protocol,
        name=f"{protocol.name}-pixels",
        unit="pixel",
        baseline="black",
        steps=tuple(k / num_tokens for k in range(1, num_tokens)),
    )


def curve_timings(
    work: Workload, model: str, images: int, repeats: Repeats, bar: tqdm
) -> list[CurveTiming]:
    """Time each preset's curves (and vilas2023 as pixel steps) on the first ``images``.

    Maps are class-space maps of the targets (the map's values do not change the cost).

    Args:
        work: The workload, on the device to time.
        model: Model name, for the records.
        images: Images per call.
        repeats: Timed calls after the warm-up.
        bar: Progress bar, advanced once per preset.

    Returns:
        One timing per preset, then :data:`PIXEL_STEPS`.

    Example:
        >>> work = load_workload("default", 32)
        >>> timings = curve_timings(work, "default", 32, Repeats(), tqdm())
    """
    device = work.images.device
    synchronize = (
        functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None
    )
    targets = work.targets[:images]
    inputs = work.images[:images]
    maps = ClassSpaceSaliency(work.model).attribute(inputs, target=targets)
    cases = dict(PRESETS)
    cases[PIXEL_STEPS] = tuple(as_pixel_steps(p, maps[0].numel()) for p in PRESETS["vilas2023"])
    results = []
    for name, protocols in cases.items():
        bar.set_postfix_str(f"{model} {device.type} curves {name}")

        def call(protocols: Sequence[Protocol] = protocols) -> torch.Tensor:
            steps = 0
            for protocol in protocols:
                x, _ = perturbation_curves(
                    work.model, inputs, maps, targets, protocol, mean=work.mean, std=work.std
                )
                steps += len(x)
            return torch.tensor(steps)

        times, steps = time_calls(call, repeats, synchronize)
        results.append(CurveTiming(model, device.type, name, images, int(steps), times))
        bar.update()
    return results


# ---------------------------------------------------------------------------- targets
RATIO_TARGETS = (
    ("time", "class_space", "forward", "<=", 1.05),
    ("time", "class_space_all", "forward", "<=", 1.15),
    ("memory", "class_space_all", "forward", "<=", 1.2),
    ("time", "class_space", CAPTUM, "<", 1.0),
    ("time", "chefer", "class_space", ">=", 2.5),
)
"""The issue's targets per (model, device, dtype, batch size):
(figure, numerator, denominator, comparison, limit)."""

SPEARMAN_TARGET = 0.99
"""Under bf16: least per-image Spearman correlation of class-space maps with fp32's."""

CURVE_TARGET = 0.6
"""Most time of vilas2023's token curves relative to as many pixel-deletion steps."""

COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def evaluate_targets(
    measurements: Sequence[Measurement], curves: Sequence[CurveTiming]
) -> list[dict]:
    """Check :data:`RATIO_TARGETS`, :data:`SPEARMAN_TARGET` and :data:`CURVE_TARGET`.

    Args:
        measurements: All measurements.
        curves: All curve timings.

    Returns:
        Rows ``{target, model, device, dtype, batch_size, value, threshold, met}``;
        ``value`` and ``met`` are ``None`` where the value is undefined.

    Example:
        >>> missed = [t for t in evaluate_targets(rows, curves) if t["met"] is False]
    """
    groups: dict[tuple, dict[str, Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.group, {})[m.name] = m
    checks = []
    for group, rows in groups.items():
        config = dict(zip(("model", "device", "dtype", "batch_size"), group, strict=True))
        for figure, top, bottom, op, limit in RATIO_TARGETS:
            values = [
                m.median_s if figure == "time" else m.peak_bytes for m in (rows[top], rows[bottom])
            ]
            checks.append((f"{top} {figure} / {bottom}", config, _ratio(*values), op, limit))
        if config["dtype"] == "bf16":
            checks += [
                (
                    f"{name} bf16 vs fp32 min per-image Spearman",
                    config,
                    rows[name].spearman_vs_fp32["min"],
                    ">=",
                    SPEARMAN_TARGET,
                )
                for name in VARIANTS
            ]
    timings = {(c.model, c.device, c.name): c for c in curves}
    for (model, device, name), pixels in timings.items():
        if name == PIXEL_STEPS:
            tokens = timings[(model, device, "vilas2023")]
            config = dict(model=model, device=device, dtype="fp32", batch_size=tokens.images)
            value = _ratio(tokens.per_image_s, pixels.per_image_s)
            checks.append(
                ("vilas2023 token curves / pixel steps", config, value, "<=", CURVE_TARGET)
            )
    return [
        dict(
            target=target,
            **config,
            value=value,
            threshold=f"{op} {limit}",
            met=None if value is None else COMPARE[op](value, limit),
        )
        for target, config, value, op, limit in checks
    ]


# ---------------------------------------------------------------------------- report
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


def _forward_per_image(measurements: Sequence[Measurement]) -> dict[tuple[str, str], float]:
    """(model, device) -> fp32 forward time per image at the largest batch size."""
    forwards = [m for m in measurements if m.name == "forward" and m.dtype == "fp32"]
    largest = {(m.model, m.device): m for m in sorted(forwards, key=lambda m: m.batch_size)}
    return {key: m.median_s / m.batch_size for key, m in largest.items()}


def to_json(
    meta: dict,
    measurements: Sequence[Measurement],
    curves: Sequence[CurveTiming],
    targets: Sequence[dict],
) -> dict:
    """Everything as a JSON-ready dict, with the ratios to the forward.

    Args:
        meta: Environment and options of the run.
        measurements: All measurements.
        curves: All curve timings.
        targets: Rows of :func:`evaluate_targets`.

    Returns:
        ``{meta, measurements, curves, targets}``.

    Example:
        >>> Path("speed.json").write_text(json.dumps(to_json(meta, rows, curves, targets)))
    """
    forward = {m.group: m for m in measurements if m.name == "forward"}
    per_image = _forward_per_image(measurements)
    rows = [
        dict(
            dataclasses.asdict(m),
            median_s=m.median_s,
            time_ratio=_ratio(m.median_s, forward[m.group].median_s),
            memory_ratio=_ratio(m.peak_bytes, forward[m.group].peak_bytes),
        )
        for m in measurements
    ]
    curve_rows = [
        dict(
            dataclasses.asdict(c),
            per_image_s=c.per_image_s,
            forward_ratio=_ratio(c.per_image_s, per_image.get((c.model, c.device))),
        )
        for c in curves
    ]
    return dict(meta=meta, measurements=rows, curves=curve_rows, targets=list(targets))


def _cells(values: Sequence[str]) -> str:
    return "| " + " | ".join(values) + " |"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render_markdown(report: dict) -> str:
    """The Markdown tables of a :func:`to_json` report.

    One table per (model, device, dtype) with time and peak memory per batch size (and,
    under bf16, the minimum per-image Spearman correlation with fp32), then the curves per
    image and the targets.

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
        "Median wall time after a warm-up, and peak memory above the post-load baseline (CPU: "
        "ru_maxrss of a fresh process per cell, over its first call, one-time costs of ~10-30 "
        "MiB included; GPU: torch.cuda.max_memory_allocated); (Nx) = ratio to the plain "
        "no_grad forward of the same model, device, dtype and batch size.",
        "",
    ]
    rows = report["measurements"]
    for config in dict.fromkeys((r["model"], r["device"], r["dtype"]) for r in rows):
        cell = {
            (r["batch_size"], r["name"]): r
            for r in rows
            if (r["model"], r["device"], r["dtype"]) == config
        }
        batches = sorted({batch for batch, _ in cell})
        bf16 = config[2] == "bf16"
        header = ["measurement"]
        for batch in batches:
            header += [f"b={batch} time", f"b={batch} peak"] + [f"b={batch} ρ min"] * bf16
        lines += [f"## {', '.join(config)}", "", _cells(header)]
        lines.append(_cells(["---"] + ["---:"] * (len(header) - 1)))
        for name in MEASUREMENTS:
            values = [name]
            for batch in batches:
                r = cell[(batch, name)]
                values.append(f"{_seconds(r['median_s'])} ({_times(r['time_ratio'])})")
                values.append(f"{r['peak_bytes'] / 2**20:.1f} MiB ({_times(r['memory_ratio'])})")
                if bf16:
                    values.append(_number(r["spearman_vs_fp32"]["min"]))
            lines.append(_cells(values))
        lines.append("")
    if report["curves"]:
        lines += [
            "## Perturbation curves per image",
            "",
            "(Nx) = forward passes' worth: the fp32 forward per image at the largest batch.",
            "",
            _cells(["model", "device", "curves", "images", "inputs/image", "time/image"]),
            _cells(["---"] * 3 + ["---:"] * 3),
        ]
        for c in report["curves"]:
            time_cell = f"{_seconds(c['per_image_s'])} ({_times(c['forward_ratio'])})"
            lines.append(
                _cells(
                    [
                        c["model"],
                        c["device"],
                        c["name"],
                        str(c["images"]),
                        str(c["forwards_per_image"]),
                        time_cell,
                    ]
                )
            )
        lines.append("")
    lines += [
        "## Targets",
        "",
        _cells(["target", "model", "device", "dtype", "batch", "value", "threshold", "met"]),
        _cells(["---"] * 4 + ["---:"] * 2 + ["---"] * 2),
    ]
    verdicts = {True: "met", False: "**missed**", None: "n/a"}
    for t in report["targets"]:
        lines.append(
            _cells(
                [
                    t["target"],
                    t["model"],
                    t["device"],
                    t["dtype"],
                    str(t["batch_size"]),
                    _number(t["value"]),
                    t["threshold"],
                    verdicts[t["met"]],
                ]
            )
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- imputer
def imputer_timing(work: Workload, count: int, repeats: Repeats) -> dict:
    """Seconds per image and mask of ROAD's imputation, ours against pytorch-grad-cam's.

    Each of the first ``count`` images gets one seeded random pixel mask per road2022
    removal fraction (10 … 90 %); a timed call imputes all of them, one image at a time
    (as the curves do), with the default noise 0.01. pytorch-grad-cam is imported here
    only: it is a test dependency.

    Args:
        work: The workload (its images are imputed on the CPU).
        count: Images per timed call.
        repeats: How many timed calls.

    Returns:
        ``{"images", "masks", "image_size", "ours_s", "reference_s", "ratio"}``: median
        seconds per image and mask and ``ours_s / reference_s``.

    Example:
        >>> imputer_timing(load_workload("default", 8), 8, Repeats(fixed=3))["ratio"]
    """
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    images = work.images[:count].cpu()
    fractions = PRESETS["road2022"][0].steps
    generator = torch.Generator().manual_seed(0)
    pairs = [
        (image, torch.rand(images.shape[-2:], generator=generator) >= fraction)
        for image in images
        for fraction in fractions
    ]
    reference = NoisyLinearImputer(noise=0.01)

    def ours() -> torch.Tensor:
        return torch.stack([noisy_linear_impute(i[None], k[None])[0] for i, k in pairs])

    def theirs() -> torch.Tensor:
        return torch.stack([reference(i, k.float()) for i, k in pairs])

    medians = {}
    for name, call in (("ours", ours), ("reference", theirs)):
        times, _ = time_calls(call, repeats)
        medians[name] = statistics.median(times) / len(pairs)
    return dict(
        images=len(images),
        masks=len(pairs),
        image_size=list(images.shape[1:]),
        ours_s=medians["ours"],
        reference_s=medians["reference"],
        ratio=_ratio(medians["ours"], medians["reference"]),
    )


def render_imputer(row: dict) -> str:
    """A Markdown table of :func:`imputer_timing`'s result."""
    size = "x".join(str(v) for v in row["image_size"])
    return "\n".join(
        [
            f"ROAD noisy linear imputation, per image and mask ({row['masks']} masks, {size}):",
            "",
            "| imputer | time | ratio |",
            "|---|---|---|",
            _cells(["`noisy_linear_impute`", _seconds(row["ours_s"]), _times(row["ratio"])]),
            _cells(["pytorch-grad-cam `NoisyLinearImputer`", _seconds(row["reference_s"]), "1x"]),
            "",
        ]
    )


# ---------------------------------------------------------------------------- main
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
        help="smoke run: embedded model, batch sizes 1 and 4, up to 3 timed calls, curves on "
        "4 images",
    )
    parser.add_argument(
        "--models", nargs="+", help=f"'default' and/or timm model names (default {MODELS})"
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, help=f"default {BATCH_SIZES}")
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed calls after the warm-up (default: ~3 s worth, 2 to 20)",
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
        "benchmarks/results/speed.json, speed_quick.json with --quick)",
    )
    args = parser.parse_args(argv)
    for name in ("batch_sizes", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and min(value if isinstance(value, list) else [value]) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark, write JSON and Markdown, print the tables.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Example:
        >>> main(["--quick", "--threads", "1"])
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only_imputer:
        row = imputer_timing(load_workload("default", CURVE_IMAGES), CURVE_IMAGES, Repeats(fixed=3))
        out = args.out or Path("benchmarks/results/speed_imputer.json")
        out.write_text(json.dumps(dict(environment(args.threads), imputer=row), indent=1) + "\n")
        out.with_suffix(".md").write_text(render_imputer(row))
        print(render_imputer(row))
        return
    quick = args.quick
    models = args.models or (["default"] if quick else list(MODELS))
    batch_sizes = args.batch_sizes or ([1, 4] if quick else list(BATCH_SIZES))
    curve_images = 4 if quick else CURVE_IMAGES
    repeats = Repeats(args.repeats, budget_s=0.2, most=3) if quick else Repeats(args.repeats)
    out = args.out or Path(f"benchmarks/results/speed{'_quick' if quick else ''}.json")
    cuda = torch.cuda.is_available()

    started = time.perf_counter()
    per_model = len(batch_sizes) * len(MEASUREMENTS) * (1 + len(DTYPES) * cuda)
    curve_runs = len(PRESETS) + 1
    total = sum(per_model + curve_runs * ((m in CPU_CURVE_MODELS) + cuda) for m in models)
    measurements: list[Measurement] = []
    curves: list[CurveTiming] = []
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    with tqdm(total=total, desc="speed", unit="run") as bar, tempfile.TemporaryDirectory() as tmp:
        for model in models:
            work = load_workload(model, max(*batch_sizes, curve_images))
            bundle = Path(tmp) / "workload.pt"
            torch.save(dict(model=work.model, images=work.images, targets=work.targets), bundle)
            measurements += cpu_measurements(
                context, bundle, model, batch_sizes, args.threads, repeats, bar
            )
            if model in CPU_CURVE_MODELS:
                curves += curve_timings(work, model, curve_images, repeats, bar)
            if cuda:
                on_gpu = work.to("cuda")
                measurements += gpu_measurements(on_gpu, model, batch_sizes, repeats, bar)
                curves += curve_timings(on_gpu, model, curve_images, repeats, bar)

    meta = dict(
        environment(args.threads),
        models=models,
        batch_sizes=batch_sizes,
        repeats=dataclasses.asdict(repeats),
        curve_images=curve_images,
        quick=quick,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        duration_s=time.perf_counter() - started,
    )
    report = to_json(meta, measurements, curves, evaluate_targets(measurements, curves))
    report["imputer"] = imputer_timing(
        load_workload("default", curve_images), curve_images, repeats
    )
    markdown = render_markdown(report) + "\n" + render_imputer(report["imputer"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
