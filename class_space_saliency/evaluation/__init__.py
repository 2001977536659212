"""Faithfulness evaluation: perturbation protocols, curves, the benchmark runner and report.

Example:
    >>> from class_space_saliency.evaluation import run_benchmark
    >>> report = run_benchmark(model, (images, labels), ["class_space"], ["chefer2021"],
    ...     mean=(0.5,) * 3, std=(0.5,) * 3, out_dir="runs/a")
"""

from .._deprecation import deprecated_aliases
from .curves import (
    area_under_curve,
    curve_x,
    perturbation_curves,
    perturbation_scores,
    step_counts,
)
from .datasets import ImageFolderDataset, TensorPairDataset, UnreadableImageError
from .imputation import noisy_linear_impute
from .localisation import localisation
from .protocols import PRESETS, PROTOCOLS, PerturbationProtocol, resolve_protocols
from .report import BenchmarkReport, MethodRow, summarize, write_report
from .runner import run_benchmark
from .store import load_config, load_records

__all__ = [
    "PRESETS",
    "PROTOCOLS",
    "BenchmarkReport",
    "ImageFolderDataset",
    "MethodRow",
    "PerturbationProtocol",
    "TensorPairDataset",
    "UnreadableImageError",
    "area_under_curve",
    "curve_x",
    "load_config",
    "load_records",
    "localisation",
    "noisy_linear_impute",
    "perturbation_curves",
    "perturbation_scores",
    "resolve_protocols",
    "run_benchmark",
    "step_counts",
    "summarize",
    "write_report",
]

__getattr__ = deprecated_aliases(__name__, {"Protocol": "PerturbationProtocol"}, globals())
