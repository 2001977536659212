"""Saliency methods, all on one Captum-style base (:class:`SaliencyMethod`).

Every method is also registered under a short name so that the benchmark and the CLI can
build it from a string: ``create_method("class_space", model, layer=-1)``.
"""

from __future__ import annotations

from torch import nn

from .base import SaliencyMethod
from .chefer import CheferRollout
from .class_space import ClassSpaceSaliency
from .class_space_gradient import ClassSpaceAttentionGradient
from .controls import IntensitySaliency, RandomSaliency, SobelSaliency
from .gradcam import GradCAM
from .raw_attention import RawAttention
from .rollout import AttentionRollout

METHODS: dict[str, type[SaliencyMethod]] = {
    "class_space": ClassSpaceSaliency,
    "class_space_gradient": ClassSpaceAttentionGradient,
    "gradcam": GradCAM,
    "rollout": AttentionRollout,
    "chefer": CheferRollout,
    "raw_attention": RawAttention,
    "random": RandomSaliency,
    "sobel": SobelSaliency,
    "intensity": IntensitySaliency,
}
"""Registry: method name -> class."""


def create_method(name: str, model: nn.Module, **kwargs) -> SaliencyMethod:
    """Build a registered method by name.

    Args:
        name: A key of :data:`METHODS`, e.g. ``"class_space"``.
        model: The model to explain.
        **kwargs: Constructor options of that method.

    Returns:
        The method instance.

    Example:
        >>> explainer = create_method("class_space", model, layer=-2)
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name](model, **kwargs)


__all__ = [
    "METHODS",
    "AttentionRollout",
    "CheferRollout",
    "ClassSpaceAttentionGradient",
    "ClassSpaceSaliency",
    "GradCAM",
    "IntensitySaliency",
    "RandomSaliency",
    "RawAttention",
    "SaliencyMethod",
    "SobelSaliency",
    "create_method",
]
