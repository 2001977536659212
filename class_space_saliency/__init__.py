"""class-space-saliency: explain Vision Transformers in their class embedding space.

Example:
    >>> from class_space_saliency import ClassSpaceSaliency
    >>> maps = ClassSpaceSaliency(model).attribute(images, target=labels)
    >>> maps.shape  # (B, 1, h, w): one map per image on the 4x4 patch grid
    torch.Size([3, 1, 4, 4])
"""

from .adapters import UnsupportedModelError
from .anatomy import ViTAnatomy
from .methods import (
    AttentionRollout,
    CheferRollout,
    ClassSpaceAttentionGradient,
    ClassSpaceSaliency,
    GradCAM,
    IntensitySaliency,
    RandomSaliency,
    RawAttention,
    SaliencyMethod,
    SobelSaliency,
)
from .projection import Identifiability, class_identifiability, token_scores

__version__ = "0.1.0"

__all__ = [
    "AttentionRollout",
    "CheferRollout",
    "ClassSpaceAttentionGradient",
    "ClassSpaceSaliency",
    "GradCAM",
    "Identifiability",
    "IntensitySaliency",
    "RandomSaliency",
    "RawAttention",
    "SaliencyMethod",
    "SobelSaliency",
    "UnsupportedModelError",
    "ViTAnatomy",
    "class_identifiability",
    "token_scores",
]
