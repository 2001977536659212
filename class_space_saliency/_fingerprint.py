"""Short content hashes that tell one model's weights from another's in a run's config."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """A short SHA-256 of the model's state dict (names, dtypes, shapes and values).

    Example:
        >>> model_fingerprint(torch.nn.Linear(2, 2)) == model_fingerprint(torch.nn.Linear(2, 2))
        False
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{values.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
