"""class-space-saliency: explain Vision Transformers in their class embedding space.

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

__version__ = "0.1.0"

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
]
