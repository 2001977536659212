"""Saliency methods, all on one Captum-style base (:class:`SaliencyMethod`), and their registry.

Every method registers itself with one decorator line (:func:`register_method`), so that the
CLI, the benchmark and the sanity check build it from a string:
``create_method("class_space", model, layer=-1)``; :func:`list_methods` lists (and filters)
them. Named variants are registered methods with fixed options, e.g.
``"class_space_gradient_paper"``. The modules below are imported in registration order.
"""

from __future__ import annotations

# The import order is the registration order, which list_methods() reports.
# isort: off
from .base import MethodOptions, SaliencyMethod
from .class_space import ClassSpaceOptions, ClassSpaceSaliency
from .class_space_gradient import ClassSpaceAttentionGradient, ClassSpaceGradientOptions
from .class_space_contributions import ClassSpaceContributions, ClassSpaceContributionsOptions
from .gradcam import GradCAM, GradCAMOptions
from .rollout import AttentionRollout, RolloutOptions
from .chefer import CheferRollout
from .raw_attention import RawAttention, RawAttentionOptions
from .linear_probe import LinearProbeOptions, LinearProbeSaliency
from .controls import IntensitySaliency, RandomOptions, RandomSaliency, SobelSaliency
from .registry import (
    COSTS,
    FLAGS,
    METHODS,
    VARIANTS,
    MethodInfo,
    create_method,
    create_methods,
    list_methods,
    method_info,
    method_names,
    register_method,
    register_variant,
    unregister_method,
)

# isort: on

__all__ = [
    "COSTS",
    "FLAGS",
    "METHODS",
    "VARIANTS",
    "AttentionRollout",
    "CheferRollout",
    "ClassSpaceAttentionGradient",
    "ClassSpaceContributions",
    "ClassSpaceContributionsOptions",
    "ClassSpaceGradientOptions",
    "ClassSpaceOptions",
    "ClassSpaceSaliency",
    "GradCAM",
    "GradCAMOptions",
    "IntensitySaliency",
    "LinearProbeOptions",
    "LinearProbeSaliency",
    "MethodInfo",
    "MethodOptions",
    "RandomOptions",
    "RandomSaliency",
    "RawAttention",
    "RawAttentionOptions",
    "RolloutOptions",
    "SaliencyMethod",
    "SobelSaliency",
    "create_method",
    "create_methods",
    "list_methods",
    "method_info",
    "method_names",
    "register_method",
    "register_variant",
    "unregister_method",
]
