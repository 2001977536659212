"""Saliency methods, all on one Captum-style base (:class:`SaliencyMethod`)."""

from .base import SaliencyMethod
from .class_space import ClassSpaceSaliency
from .class_space_gradient import ClassSpaceAttentionGradient

__all__ = ["ClassSpaceAttentionGradient", "ClassSpaceSaliency", "SaliencyMethod"]
