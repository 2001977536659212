"""Class-space projection of token states: per-token class scores.

For a token state ``x`` at any block, ``p = head(norm(x))`` are its class logits (Vilas et
al., NeurIPS 2023). The target-only path gathers the target rows of a linear head so that
saliency costs ``O(N * D)`` per block instead of ``O(N * D * C)``.
"""

from __future__ import annotations

import torch

from ._deprecation import deprecated_aliases
from ._validation import check_choice
from .anatomy import ViTAnatomy

TOKEN_SCORES = ("logit", "probability", "rank")
"""Per-token scores of the target class: its logit, its softmax probability, or its
normalised rank ``1 - rank / C`` (1 = top-1)."""


def target_logits(anatomy: ViTAnatomy, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logit of each example's target class for every token, without the other classes.

    Args:
        anatomy: The model's anatomy.
        tokens: Token states (B, N, D).
        target: Class index per example (B,).

    Returns:
        (B, N) target logits ``head(norm(tokens))[..., target]``.
    """
    linear = anatomy.linear_head()
    if linear is None:
        return target_class_column(anatomy.project(tokens), target)
    weight, bias = linear
    normed = anatomy.norm(tokens)
    rows = weight[target.to(weight.device)].to(normed.dtype)  # (B, D)
    scores = torch.bmm(normed, rows.unsqueeze(-1)).squeeze(-1)  # (B, N); bmm: no einsum parse
    return scores + bias[target.to(bias.device)][:, None]


def target_class_column(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gather ``logits[b, ..., target[b]]`` from (B, ..., C) logits -> (B, ...)."""
    index = target.to(logits.device).view(-1, *([1] * (logits.dim() - 1)))
    index = index.expand(*logits.shape[:-1], 1)
    return logits.gather(-1, index).squeeze(-1)


def normalized_rank(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - rank(target) / C`` for (B, ..., C) logits; 1 where the target is top-1.

    The rank counts the classes with a strictly larger logit.
    """
    target_logit = target_class_column(logits, target).unsqueeze(-1)
    rank = (logits > target_logit).sum(-1)
    return 1.0 - rank.float() / logits.shape[-1]


def token_scores(
    anatomy: ViTAnatomy, tokens: torch.Tensor, target: torch.Tensor, score: str = "logit"
) -> torch.Tensor:
    """Score of each example's target class for every token.

    Args:
        anatomy: The model's anatomy.
        tokens: Token states (B, N, D).
        target: Class index per example (B,).
        score: ``"logit"``, ``"probability"`` or ``"rank"`` (see :data:`TOKEN_SCORES`).

    Returns:
        (B, N) float32 scores.
    """
    check_choice("score", score, TOKEN_SCORES)
    if score == "logit":
        return target_logits(anatomy, tokens, target).float()
    logits = anatomy.project(tokens).float()
    if score == "probability":
        return target_class_column(logits.softmax(-1), target)
    return normalized_rank(logits, target)


__getattr__ = deprecated_aliases(__name__, {"SCORES": "TOKEN_SCORES"}, globals())
