"""Saliency methods, all on one Captum-style base (:class:`SaliencyMethod`).

Every method is also registered under a short name so that the benchmark and the CLI can
build it from a string: ``create_method("class_space", model, layer=-1)``. Named variants
(:data:`VARIANTS`) are registered methods with fixed options, e.g.
``"class_space_gradient_paper"``.
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

VARIANTS: dict[str, tuple[str, dict]] = {
    "class_space_gradient_paper": ("class_space_gradient", {"paper_exact": True}),
}
"""Named variants: name -> (registered method, fixed constructor options).

``class_space_gradient_paper`` is the map the paper's perturbation figures rank tokens by
(official ``explain_perturbation.py``, source ``grads``): the double softmax of the official
code (``paper_exact=True``).
"""


def method_names() -> list[str]:
    """Every name :func:`create_method` accepts: the registry, then the variants."""
    return [*METHODS, *VARIANTS]


def create_method(name: str, model: nn.Module, **kwargs) -> SaliencyMethod:
    """Build a registered method or named variant by name.

    Args:
        name: A key of :data:`METHODS` or :data:`VARIANTS`, e.g. ``"class_space"``.
        model: The model to explain.
        **kwargs: Constructor options of that method (for a variant: options beside the
            fixed ones).

    Returns:
        The method instance.

    Raises:
        ValueError: For an unknown name or an option that overrides a variant's fixed one.

    Example:
        >>> explainer = create_method("class_space", model, layer=-2)
        >>> paper = create_method("class_space_gradient_paper", model)
    """
    if name in VARIANTS:
        base, fixed = VARIANTS[name]
        clash = sorted(set(fixed) & set(kwargs))
        if clash:
            raise ValueError(f"method {name!r} fixes {clash}; use {base!r} to choose them")
        return METHODS[base](model, **fixed, **kwargs)
    if name not in METHODS:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return METHODS[name](model, **kwargs)


__all__ = [
    "METHODS",
    "VARIANTS",
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
    "method_names",
]
