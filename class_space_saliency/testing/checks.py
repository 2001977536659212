"""Checks a method's tests need: the model is left as it was; token removal is key masking."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..evaluation.curves import perturbation_curves
from ..evaluation.protocols import PROTOCOLS


def model_state(model: nn.Module) -> dict[str, list]:
    """Everything a method must leave untouched: modes, flags, gradients, weights, hooks.

    Args:
        model: the user's model.

    Returns:
        A snapshot for :func:`assert_state_unchanged`.
    """
    return dict(
        training=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        grads=[p.grad for p in model.parameters()],
        fused=[getattr(m, "fused_attn", None) for m in model.modules()],
        params=[p.detach().clone() for p in model.parameters()],
        hooks=[
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    )


def assert_state_unchanged(model: nn.Module, before: dict[str, list]) -> None:
    """Assert that ``model`` matches the :func:`model_state` snapshot ``before``.

    Raises:
        AssertionError: naming what changed.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> before = model_state(layer)
        >>> handle = layer.register_forward_hook(lambda *args: None)
        >>> assert_state_unchanged(layer, before)
        Traceback (most recent call last):
        ...
        AssertionError: hooks changed
    """
    after = model_state(model)
    for key in ("training", "requires_grad", "fused", "hooks"):
        assert after[key] == before[key], f"{key} changed"
    assert all(g is None for g in after["grads"]), "a parameter has a .grad"
    for p_before, p_after in zip(before["params"], after["params"], strict=True):
        assert torch.equal(p_before, p_after), "a parameter changed"


def removal_keep_masks(
    saliency: torch.Tensor, num_prefix_tokens: int, most_salient_first: bool = True
) -> list[torch.Tensor]:
    """The tokens kept after removing 1, 2, ..., N - 1 image tokens in saliency order.

    Args:
        saliency: maps (B, 1, h, w) without ties.
        num_prefix_tokens: tokens in front of the image tokens (always kept).
        most_salient_first: remove the most salient tokens first (positive order).

    Returns:
        N - 1 bool masks (B, num_prefix_tokens + N), True = kept.

    Example:
        >>> masks = removal_keep_masks(torch.tensor([[[[0.1, 0.9], [0.5, 0.3]]]]), 1)
        >>> [m.int().tolist() for m in masks]
        [[[1, 1, 0, 1, 1]], [[1, 1, 0, 0, 1]], [[1, 1, 0, 0, 0]]]
    """
    flat = saliency.flatten(1)
    batch, n = flat.shape
    order = flat.argsort(dim=1, descending=most_salient_first, stable=True)
    masks = []
    for removed in range(1, n):
        keep = torch.ones(batch, num_prefix_tokens + n, dtype=torch.bool)
        keep.scatter_(1, order[:, :removed] + num_prefix_tokens, False)
        masks.append(keep)
    return masks


def assert_token_removal_matches(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    target: torch.Tensor,
    masked_logits: Callable[[torch.Tensor], torch.Tensor],
    num_prefix_tokens: int,
    protocol: str = "vilas2023/positive",
) -> None:
    """Assert that the token-removal curve equals the model run with tokens masked out.

    Draws a seeded random map (4x4 grid), computes the protocol's logit curve with
    :func:`~class_space_saliency.evaluation.perturbation_curves` (mean 0.5, std 0.5) and
    compares every step with ``masked_logits(keep)`` -- the caller's own computation of the
    logits with the removed tokens masked out (as attention keys and out of any mean).

    Args:
        model: the classifier.
        images: (B, 3, H, W) with a 4x4 patch grid.
        target: (B,) classes whose logits are compared.
        masked_logits: keep mask (B, num_prefix_tokens + 16) -> logits (B, C).
        num_prefix_tokens: tokens in front of the image tokens.
        protocol: a token protocol (``vilas2023/positive`` or ``vilas2023/negative``).
    """
    saliency = torch.randn(len(images), 1, 4, 4, generator=torch.Generator().manual_seed(2))
    chosen = dataclasses.replace(PROTOCOLS[protocol], score="logit")
    _, curves = perturbation_curves(
        model, images, saliency, target, chosen, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    positive = protocol.endswith("positive")
    rows = torch.arange(len(images))
    masks = removal_keep_masks(saliency, num_prefix_tokens, most_salient_first=positive)
    assert curves.shape[1] == len(masks)
    for step, keep in enumerate(masks):
        with torch.no_grad():
            want = masked_logits(keep)[rows, target]
        torch.testing.assert_close(curves[:, step], want, atol=1e-5, rtol=1e-4)
