"""Interoperability with other explainability toolkits (Quantus).

Captum needs no adapter: every method is a Captum ``Attribution`` (see the README section
"Use it like Captum"). Quantus calls an ``explain_func(model, inputs, targets, **kwargs)``
on numpy batches; :func:`explain_func` is that function for every registered method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ._validation import check_bool
from .methods import create_method


def explain_func(
    model: nn.Module,
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor | int | list[int] | None,
    method: str = "class_space",
    device: str | torch.device | None = None,
    max_batch_size: int | None = None,
    positive_only: bool = False,
    **options: Any,
) -> np.ndarray:
    """Saliency maps in Quantus's ``explain_func`` convention.

    Quantus's localisation metrics take the attributions as they come: with signed maps
    (class-space logits are negative where a token argues against the class)
    ``RelevanceMassAccuracy``'s ``sum(a in mask) / sum(a)`` leaves [0, 1], and ``abs=True``
    counts negative evidence as relevance. ``positive_only=True`` returns the positive part
    ``max(map, 0)``, the relevance of Arras et al.'s definition, with which Quantus's
    ``RelevanceMassAccuracy(abs=False)`` equals this library's
    :func:`~class_space_saliency.evaluation.localisation` ``relevance_mass`` (Quantus's
    default ``normalise=True`` divides each map by its largest absolute value, which leaves
    the ratio unchanged).

    Args:
        model: The ViT to explain (a Quantus model wrapper is unwrapped).
        inputs: Normalised images (B, C, H, W), numpy or torch.
        targets: Class per image (B,), an int, or ``None`` for the predicted class.
        method: A registered method name (see :func:`~class_space_saliency.list_methods`).
        device: Where to compute (Quantus passes its ``device``); default: the model's.
        max_batch_size: Images per forward pass.
        positive_only: Return ``max(map, 0)`` (the positive evidence).
        **options: Constructor options of the method, e.g. ``layer=-2`` or ``score="rank"``.

    Returns:
        float32 numpy maps (B, 1, H, W), bilinearly upsampled to the input size.

    Example:
        >>> import quantus
        >>> metric = quantus.RelevanceMassAccuracy(abs=False, normalise=True,
        ...                                        disable_warnings=True)
        >>> scores = metric(model=model, x_batch=images.numpy(), y_batch=labels.numpy(),
        ...                 a_batch=None, s_batch=masks.float().numpy(),
        ...                 explain_func=explain_func,
        ...                 explain_func_kwargs={"method": "class_space", "positive_only": True})
        >>> len(scores), all(0 <= score <= 1 for score in scores)
        (3, True)
    """
    check_bool("positive_only", positive_only)
    if hasattr(model, "get_model") and not isinstance(model, nn.Module):
        model = model.get_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if device is None:
        device = next(model.parameters()).device
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(np.ascontiguousarray(inputs))
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a numpy array or tensor, got {type(inputs).__name__}")
    inputs = inputs.to(device=device, dtype=torch.float32)
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(targets.astype(np.int64).reshape(-1))
    elif isinstance(targets, np.integer):
        targets = int(targets)
    explainer = create_method(method, model, **options)
    maps = explainer.attribute(inputs, target=targets, upsample=True, max_batch_size=max_batch_size)
    if positive_only:
        maps = maps.clamp(min=0)
    return maps.detach().cpu().numpy().astype(np.float32)
