"""class-space-saliency: explain Vision Transformers in their class embedding space.

The public names below load on first use (PEP 562), so that ``import class_space_saliency``
and the command line's ``--help`` cost no torch import; submodules load the same way
(``class_space_saliency.models``).

Example:
    >>> import timm, torch
    >>> from class_space_saliency import ClassSpaceSaliency, list_methods
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
    ...                           num_classes=5)
    >>> ClassSpaceSaliency(model).attribute(torch.randn(2, 3, 32, 32), target=[0, 3]).shape
    torch.Size([2, 1, 4, 4])
    >>> list_methods(model_agnostic=True)
    ['random', 'sobel', 'intensity']
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "UnsupportedModelError": "adapters",
    "ViTAnatomy": "anatomy",
    "Identifiability": "analysis",
    "class_identifiability": "analysis",
    "Decomposition": "decomposition",
    "decompose": "decomposition",
    "token_scores": "projection",
    **dict.fromkeys(
        (
            "AttentionRollout",
            "CheferRollout",
            "ClassSpaceAttentionGradient",
            "ClassSpaceContributions",
            "ClassSpaceSaliency",
            "GradCAM",
            "IntensitySaliency",
            "RandomSaliency",
            "RawAttention",
            "SaliencyMethod",
            "SobelSaliency",
            "create_method",
            "list_methods",
            "register_method",
        ),
        "methods",
    ),
}
"""Public name -> the submodule that defines it (``analysis`` is a public submodule)."""

__all__ = [
    "AttentionRollout",
    "CheferRollout",
    "ClassSpaceAttentionGradient",
    "ClassSpaceContributions",
    "ClassSpaceSaliency",
    "Decomposition",
    "GradCAM",
    "Identifiability",
    "IntensitySaliency",
    "RandomSaliency",
    "RawAttention",
    "SaliencyMethod",
    "SobelSaliency",
    "UnsupportedModelError",
    "ViTAnatomy",
    "analysis",
    "class_identifiability",
    "create_method",
    "decompose",
    "list_methods",
    "register_method",
    "token_scores",
]  # the keys of _EXPORTS and "analysis" (tests/test_cli_startup.py checks)


def __getattr__(name: str) -> Any:
    """Load a public name, or a submodule, on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from . import analysis
    from .adapters import UnsupportedModelError
    from .analysis import Identifiability, class_identifiability
    from .anatomy import ViTAnatomy
    from .decomposition import Decomposition, decompose
    from .methods import (
        AttentionRollout,
        CheferRollout,
        ClassSpaceAttentionGradient,
        ClassSpaceContributions,
        ClassSpaceSaliency,
        GradCAM,
        IntensitySaliency,
        RandomSaliency,
        RawAttention,
        SaliencyMethod,
        SobelSaliency,
        create_method,
        list_methods,
        register_method,
    )
    from .projection import token_scores
