"""Reproduce the paper: its analyses and token-removal test on its seven models, one report.

:func:`reproduce` runs, per model of :data:`~class_space_saliency.paper.PAPER_MODELS`, every
analysis of :data:`~class_space_saliency.analysis.ANALYSES` (new analyses join as they are
registered), the ``vilas2023`` token-removal benchmark with the paper's map, Chefer's and a
random one, and the official notebook's value-vector classes; :func:`plan_reproduction` is its
dry run. The report sets our numbers beside
:data:`~class_space_saliency.paper.PAPER_RESULTS`.

Example:
    >>> from class_space_saliency.reproduce import plan_reproduction
    >>> plan = plan_reproduction("runs/paper", models=["vit_b_16"])
    >>> plan.models[0].weights, plan.models[0].steps[-1]
    ('timm vit_base_patch16_224.augreg_in21k_ft_in1k', 'value_vector_classes')
"""

from .plan import (
    BENCHMARK_METHODS,
    STEPS,
    ArchitectureCost,
    DataPlan,
    ModelPlan,
    ReproductionPlan,
    architecture_cost,
    benchmark_forward_passes,
    plan_reproduction,
)
from .report import RESULT_PATHS, ReproductionReport, our_value, write_reproduction_report
from .run import (
    ANALYSIS_OPTIONS,
    TOKEN_RULE,
    ModelFactory,
    StepLedger,
    analysis_options,
    memory_classes,
    paper_model_factory,
    reproduce,
)

__all__ = [
    "ANALYSIS_OPTIONS",
    "BENCHMARK_METHODS",
    "RESULT_PATHS",
    "STEPS",
    "TOKEN_RULE",
    "ArchitectureCost",
    "DataPlan",
    "ModelFactory",
    "ModelPlan",
    "ReproductionPlan",
    "ReproductionReport",
    "StepLedger",
    "analysis_options",
    "architecture_cost",
    "benchmark_forward_passes",
    "memory_classes",
    "our_value",
    "paper_model_factory",
    "plan_reproduction",
    "reproduce",
    "write_reproduction_report",
]
