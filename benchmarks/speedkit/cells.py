"""The measured cells: each times a call interleaved with its reference, and measures memory.

A method cell alternates the method and the plain forward of the same batch (the forward
cell times the forward alone); a curve cell alternates the plain forward of its images with
every preset's perturbation curves; the imputer cell alternates ours and pytorch-grad-cam's.
Every cell has a warm-up round, then at least ``Repeats.least`` timed rounds.
"""

from __future__ import annotations

import functools
import gc
import math
import multiprocessing
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from class_space_saliency import ClassSpaceSaliency
from class_space_saliency._stats import spearman
from class_space_saliency.evaluation import (
    PRESETS,
    PerturbationProtocol,
    noisy_linear_impute,
    perturbation_curves,
)

from .memory import gpu_peak_bytes, max_rss_bytes, run_in_fresh_process
from .timing import Repeats, interleave, timed, warm_up
from .workloads import MEASUREMENTS, PIXEL_STEPS, Workload, as_pixel_steps, make_call

DTYPES = ("fp32", "bf16")
"""GPU precisions: plain fp32, and bf16 autocast."""


@dataclass
class Measurement:
    """Timed rounds and peak memory of one measurement in one configuration.

    Attributes:
        model: Model name.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"fp32"`` or ``"bf16"`` (autocast).
        batch_size: Images per call.
        name: One of :data:`~.workloads.MEASUREMENTS`.
        times_s: Wall time of the measurement's call in each timed round.
        forward_s: Wall time of the plain forward in the same rounds (for ``forward``:
            ``times_s``).
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
    forward_s: list[float]
    peak_bytes: int
    spearman_vs_fp32: dict[str, float | None] | None = None

    @property
    def group(self) -> tuple[str, str, str, int]:
        """The configuration whose forward this is compared with."""
        return (self.model, self.device, self.dtype, self.batch_size)


@dataclass
class CurveTiming:
    """Timed rounds of one preset's perturbation curves on a batch of images.

    Attributes:
        model: Model name.
        device: ``"cpu"`` or ``"cuda"``.
        name: Preset name, or :data:`~.workloads.PIXEL_STEPS`.
        images: Images per call.
        forwards_per_image: Perturbed inputs per image over the preset's curves.
        times_s: Wall time of each round's call (all images, all curves of the preset).
        forward_s: Wall time of the plain forward of the same images in the same rounds.
    """

    model: str
    device: str
    name: str
    images: int
    forwards_per_image: int
    times_s: list[float]
    forward_s: list[float]


def _cell_calls(name: str, work: dict, batch_size: int, dtype: str = "fp32") -> dict:
    """``{name: call, "forward": call}`` on the first ``batch_size`` inputs (one for forward)."""
    images, targets = work["images"][:batch_size], work["targets"][:batch_size]
    names = dict.fromkeys((name, "forward"))
    return {n: make_call(n, work["model"], images, targets, dtype) for n in names}


def measure_in_child(
    bundle: str, name: str, batch_size: int, threads: int, repeats: Repeats
) -> tuple[list[float], list[float], int]:
    """Run in a fresh process: peak memory of the first call, then the interleaved rounds.

    Args:
        bundle: A ``torch.save``-d dict with the workload's ``model``, ``images`` and
            ``targets``.
        name: One of :data:`~.workloads.MEASUREMENTS`.
        batch_size: Images per call (the first ``batch_size`` of the bundle).
        threads: Torch CPU threads.
        repeats: Timed rounds (estimated from the first calls).

    Returns:
        ``(seconds of the call per round, of the forward per round, peak bytes of the first
        call above the baseline)``.

    Example:
        >>> times, forward, peak = measure_in_child("w.pt", "rollout", 8, 2, Repeats())
    """
    torch.set_num_threads(threads)
    calls = _cell_calls(name, torch.load(bundle, weights_only=False), batch_size)
    gc.collect()
    baseline = max_rss_bytes()
    first, _ = timed(calls[name])  # also the measurement's warm-up
    peak = max_rss_bytes() - baseline
    if name != "forward":
        first += timed(calls["forward"])[0]
    times = interleave(calls, repeats.count(first))
    return times[name], times["forward"], peak


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
        repeats: Timed rounds after the warm-up.
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
            args = (str(bundle), name, batch_size, threads, repeats)
            times, forward, peak = run_in_fresh_process(context, measure_in_child, args)
            results.append(
                Measurement(model, "cpu", "fp32", batch_size, name, times, forward, peak)
            )
            bar.update()
    return results


def _min_and_median(values: Sequence[float]) -> dict[str, float | None]:
    """``{"min", "median"}`` over the defined (non-NaN) values, ``None`` if there are none."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return {"min": None, "median": None}
    return {"min": min(defined), "median": statistics.median(defined)}


def gpu_measurements(
    work: Workload, model: str, batch_sizes: Sequence[int], repeats: Repeats, bar: tqdm
) -> list[Measurement]:
    """Every measurement at every batch size in fp32 and bf16 autocast, in this process.

    bf16 records carry the per-image Spearman correlation of their output with fp32's.

    Args:
        work: The workload on a CUDA device.
        model: Model name, for the records.
        batch_sizes: Batch sizes to measure.
        repeats: Timed rounds after the warm-up.
        bar: Progress bar, advanced once per measurement and dtype.

    Returns:
        The measurements.

    Example:
        >>> rows = gpu_measurements(work.to("cuda"), "default", [8], Repeats(), tqdm())
    """
    device = work.images.device
    synchronize = functools.partial(torch.cuda.synchronize, device)
    bundle = dict(model=work.model, images=work.images, targets=work.targets)
    results = []
    for batch_size in batch_sizes:
        for name in MEASUREMENTS:
            outputs = {}
            for dtype in DTYPES:
                bar.set_postfix_str(f"{model} cuda {dtype} b={batch_size} {name}")
                calls = _cell_calls(name, bundle, batch_size, dtype)
                round_s, _ = warm_up(calls, synchronize)
                times = interleave(calls, repeats.count(round_s), synchronize)
                peak, outputs[dtype] = gpu_peak_bytes(calls[name], device)
                record = (times[name], times["forward"], peak)
                results.append(Measurement(model, "cuda", dtype, batch_size, name, *record))
                bar.update()
            agreement = spearman(outputs["fp32"].float(), outputs["bf16"].float())
            results[-1].spearman_vs_fp32 = _min_and_median(agreement.tolist())
    return results


def curve_timings(
    work: Workload, model: str, images: int, repeats: Repeats, bar: tqdm
) -> list[CurveTiming]:
    """Time each preset's curves (and vilas2023 as pixel steps) on the first ``images``.

    One cell: every round runs the plain forward of the images, then each preset's curves.
    Maps are class-space maps of the targets (the map's values do not change the cost).

    Args:
        work: The workload, on the device to time.
        model: Model name, for the records.
        images: Images per call.
        repeats: Timed rounds after the warm-up.
        bar: Progress bar, advanced once.

    Returns:
        One timing per preset, then :data:`~.workloads.PIXEL_STEPS`.

    Example:
        >>> timings = curve_timings(load_workload("default", 32), "default", 32, Repeats(), tqdm())
    """
    device = work.images.device
    synchronize = (
        functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None
    )
    targets, inputs = work.targets[:images], work.images[:images]
    maps = ClassSpaceSaliency(work.model).attribute(inputs, target=targets)
    cases = dict(PRESETS)
    cases[PIXEL_STEPS] = tuple(as_pixel_steps(p, maps[0].numel()) for p in PRESETS["vilas2023"])

    def curves(protocols: Sequence[PerturbationProtocol]) -> int:
        steps = 0
        for protocol in protocols:
            x, _ = perturbation_curves(
                work.model, inputs, maps, targets, protocol, mean=work.mean, std=work.std
            )
            steps += len(x)
        return steps

    calls: dict[str, Callable[[], object]] = {
        "forward": make_call("forward", work.model, inputs, targets),
        **{name: functools.partial(curves, protocols) for name, protocols in cases.items()},
    }
    bar.set_postfix_str(f"{model} {device.type} curves")
    round_s, steps = warm_up(calls, synchronize)
    times = interleave(calls, repeats.count(round_s), synchronize)
    bar.update()
    return [
        CurveTiming(model, device.type, name, images, steps[name], times[name], times["forward"])
        for name in cases
    ]


def imputer_timing(work: Workload, count: int, repeats: Repeats) -> dict:
    """Seconds per image and mask of ROAD's imputation, ours against pytorch-grad-cam's.

    Each of the first ``count`` images gets one seeded random pixel mask per road2022
    removal fraction (10 … 90 %); a call imputes all of them, one image at a time (as the
    curves do), with the default noise 0.01; each round runs ours, then the reference.
    pytorch-grad-cam is imported here only: it is a test dependency.

    Args:
        work: The workload (its images are imputed on the CPU).
        count: Images per call.
        repeats: Timed rounds after the warm-up.

    Returns:
        ``{"images", "masks", "image_size", "ours_s", "reference_s"}``: seconds per image
        and mask of each call per round.

    Example:
        >>> imputer_timing(load_workload("default", 8), 8, Repeats(fixed=5))["masks"]
        72
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
    calls = {
        "ours": lambda: [noisy_linear_impute(i[None], k[None]) for i, k in pairs],
        "reference": lambda: [reference(i, k.float()) for i, k in pairs],
    }
    round_s, _ = warm_up(calls)
    times = interleave(calls, repeats.count(round_s))
    return dict(
        images=len(images),
        masks=len(pairs),
        image_size=list(images.shape[1:]),
        **{f"{name}_s": [t / len(pairs) for t in times[name]] for name in calls},
    )
