"""Checks at the public surface: clear errors that name the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .anatomy import ViTAnatomy

TargetType = int | Sequence[int] | torch.Tensor | None


def check_choice(name: str, value: str, options: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``options``, else raise ``ValueError``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_inputs(inputs: torch.Tensor, anatomy: ViTAnatomy) -> tuple[int, int]:
    """Validate a (B, C, H, W) float image batch and return its patch grid (h, w).

    Raises:
        TypeError: If ``inputs`` is not a floating-point tensor.
        ValueError: For a wrong rank, channel count or size, an empty batch, or NaN/inf.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of shape (B, C, H, W), got {type(inputs)}")
    if not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be a floating-point tensor (normalised images), got dtype {inputs.dtype}"
        )
    if inputs.dim() != 4:
        raise ValueError(
            f"inputs must have shape (B, C, H, W), got {tuple(inputs.shape)} "
            f"({inputs.dim()} dims); add a batch dimension with inputs.unsqueeze(0)"
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs is an empty batch (B = 0)")
    if anatomy.in_chans is not None and inputs.shape[1] != anatomy.in_chans:
        raise ValueError(
            f"inputs must have {anatomy.in_chans} channels for this model, "
            f"got {inputs.shape[1]} (shape {tuple(inputs.shape)})"
        )
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs contains NaN or infinite values")
    return anatomy.grid_size(inputs.shape[-2:])


def check_target(target: TargetType, batch_size: int, num_classes: int) -> torch.Tensor | None:
    """Normalise a Captum-style target to a LongTensor of shape (B,), or ``None``.

    Accepts ``None`` (the predicted class), an int (the same class for every example), a
    list/tuple of ints or a 0-d/1-d integer tensor with one entry per example.

    Raises:
        TypeError: For a non-integer target.
        ValueError: For a wrong length or a class index outside ``[0, num_classes)``.
    """
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError(f"target must be an int, a list of ints or an int tensor, got {target!r}")
    if isinstance(target, int):  # the common case, checked without tensor ops
        if not 0 <= target < num_classes:
            raise ValueError(
                f"target {target} is out of range for a model with {num_classes} "
                f"classes (valid: 0 .. {num_classes - 1})"
            )
        return torch.full((batch_size,), target, dtype=torch.long)
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must have an integer dtype, got {target.dtype}")
        if target.dim() > 1:
            raise ValueError(f"target tensor must be 0-d or 1-d, got shape {tuple(target.shape)}")
        values = target.detach().to("cpu", torch.long).reshape(-1)
        if target.dim() == 0:
            values = values.expand(batch_size)
    elif isinstance(target, Sequence) and not isinstance(target, str):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise TypeError(f"target list must hold ints only, got {list(target)!r}")
        values = torch.tensor(list(target), dtype=torch.long)
    else:
        raise TypeError(
            f"target must be None, an int, a list of ints or an int tensor, got {type(target)}"
        )
    if values.numel() != batch_size:
        raise ValueError(
            f"target has {values.numel()} entries but inputs has batch size {batch_size}"
        )
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        raise ValueError(
            f"target {values[bad][0].item()} is out of range for a model with {num_classes} "
            f"classes (valid: 0 .. {num_classes - 1})"
        )
    return values.clone()
