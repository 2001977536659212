"""One adapter per model family: where a classifier keeps what class-space analysis needs.

:func:`find_adapter` returns the first adapter whose ``matches(model)`` is true; its
``parts(model)`` are the keyword arguments of :class:`~class_space_saliency.anatomy.ViTAnatomy`
(blocks, final norm, head(s), which token rows the head reads, prefix tokens, patch grid,
attention modules and how to read their probabilities, the norm before attention for
Grad-CAM, token embedding for token-removal curves, and how to get logits from the output).
"""

from __future__ import annotations

from torch import nn

from . import (
    clip,
    hf,
    swin,
    timm_class_attention,
    timm_convit,
    timm_eva,
    timm_vit,
    torchvision_vit,
)
from .base import NormThenHeads, Readout, TokenPath, UnsupportedModelError

ADAPTERS = (clip, swin, hf, timm_eva, timm_convit, timm_class_attention, timm_vit, torchvision_vit)
"""Adapters in the order they are tried (specific families before duck-typed ones)."""


def find_adapter(model: nn.Module):
    """The adapter module of ``model``'s family, or ``None`` if none matches."""
    return next((adapter for adapter in ADAPTERS if adapter.matches(model)), None)


def looked_for() -> str:
    """What the adapters look for, for error messages."""
    return "; ".join(adapter.LOOKS_FOR for adapter in ADAPTERS)


def find_token_path(model: nn.Module) -> TokenPath:
    """How to embed and classify token sequences of ``model`` (token-removal curves).

    Raises:
        UnsupportedModelError: Where tokens cannot be removed from the model's sequence.

    Example:
        >>> path = find_token_path(model)
        >>> logits = path.classify(path.embed(images))
    """
    adapter = find_adapter(model)
    if adapter is None or adapter is timm_vit:  # timm-style toys without a head qualify too
        path = timm_vit.token_path(model)
    else:
        try:
            path = adapter.parts(model)["token_path"]
        except UnsupportedModelError as error:
            path = str(error)
    if isinstance(path, str):
        raise UnsupportedModelError(
            f"token removal is not supported for {type(model).__name__}: {path}; "
            "use a pixel or patch protocol instead"
        )
    return path


__all__ = [
    "ADAPTERS",
    "NormThenHeads",
    "Readout",
    "TokenPath",
    "UnsupportedModelError",
    "find_adapter",
    "find_token_path",
    "looked_for",
]
