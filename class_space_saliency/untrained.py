"""An untrained twin of a model: the baseline the paper compares every analysis against.

The paper's controls are the same architectures randomly initialised (official code:
``load_vit(..., pretrained=False)``). :func:`untrained_copy` builds that twin from any model
without the network: a deep copy whose parameters are drawn afresh by the model's own
initialiser where it has one (timm ``init_weights()``, Hugging Face ``_init_weights``), else by
each module's ``reset_parameters()``, and any non-constant parameter none of them reaches (e.g.
a [CLS] token or position embedding of a custom model) from ``N(0, 0.02²)``, timm's ViT
initialisation (constant ones, e.g. all-ones norm weights or a scalar temperature, are kept).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

TOKEN_INIT_STD = 0.02
"""Std of the normal draw for parameters no initialiser reaches (timm's ViT tokens)."""


def untrained_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A randomly initialised copy of ``model`` (same architecture, same device and mode).

    Initialised on the CPU from ``torch.manual_seed(seed)`` inside a forked RNG state, so the
    twin is the same on every device and the global RNG is left as it was.

    Args:
        model: Any ``nn.Module`` (timm, Hugging Face, torchvision, open_clip classifiers).
        seed: Seed of the initialisation.

    Returns:
        The copy; ``model`` itself is not changed.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.

    Example:
        >>> twin = untrained_copy(model, seed=0)
        >>> any(torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters()))
        False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    twin = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        before = {name: p.clone() for name, p in twin.named_parameters()}
        if callable(getattr(twin, "_init_weights", None)):  # Hugging Face
            twin.apply(twin._init_weights)
        elif callable(getattr(twin, "init_weights", None)):  # timm ViT, BEiT, EVA, ...
            twin.init_weights()
        else:
            for module in twin.modules():
                # nn.MultiheadAttention initialises its packed projection privately
                for name in ("reset_parameters", "_reset_parameters"):
                    if callable(getattr(module, name, None)):
                        getattr(module, name)()
                        break
        for name, parameter in twin.named_parameters():
            constant = parameter.numel() < 2 or bool((parameter == parameter.flatten()[0]).all())
            if not constant and torch.equal(parameter, before[name]):
                parameter.normal_(0.0, TOKEN_INIT_STD)
    return twin.to(device)
