"""Class-space projection of token states: per-token class scores and class identifiability.

For a token state ``x`` at any block, ``p = head(norm(x))`` are its class logits (Vilas et
al., NeurIPS 2023). The target-only path gathers the target rows of a linear head so that
saliency costs ``O(N * D)`` per block instead of ``O(N * D * C)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ._deprecation import deprecated_aliases
from ._validation import check_choice, check_inputs, check_target
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


@dataclass
class Identifiability:
    """Class identifiability per block (Vilas et al. 2023, Sec. 4).

    Attributes:
        layers: Block indices.
        token_rank: Mean normalised rank of the label over image tokens and images (L,).
        token_rate: Identifiability rate in % (L,): per image, the share of image tokens whose
            top-1 class is the label, averaged over images.
        cls_rank: Mean normalised rank of the label for the [CLS] token (L,), ``NaN`` at
            blocks whose tokens do not hold the [CLS] yet (ConViT before
            ``local_up_to_layer``); ``None`` where no analysed block holds a [CLS] that the
            head reads (pooled models, also those that keep a [CLS] or registers; CaiT and
            XCiT, whose [CLS] joins after the blocks).
        cls_rate: % of images whose [CLS] token's top-1 class is the label (L,), with
            ``NaN`` and ``None`` as ``cls_rank``.
        num_images: Images the figures average over.
        component: Which token state was projected.
    """

    layers: list[int]
    token_rank: torch.Tensor
    token_rate: torch.Tensor
    cls_rank: torch.Tensor | None
    cls_rate: torch.Tensor | None
    num_images: int
    component: str = "residual"

    def to_dict(self) -> dict:
        """Plain-Python view (lists of floats) for JSON."""

        def values(t: torch.Tensor | None) -> list[float | None] | None:
            if t is None:
                return None
            return [None if torch.isnan(v) else round(float(v), 6) for v in t]

        return dict(
            layers=self.layers,
            component=self.component,
            num_images=self.num_images,
            token_rank=values(self.token_rank),
            token_rate=values(self.token_rate),
            cls_rank=values(self.cls_rank),
            cls_rate=values(self.cls_rate),
        )

    def __str__(self) -> str:
        header = f"{'layer':>5} {'img rank':>9} {'img rate %':>10}"
        if self.cls_rank is not None:
            header += f" {'cls rank':>9} {'cls top-1 %':>11}"
        title = f"class identifiability ({self.component}, {self.num_images} images)"
        lines = [title, header]
        for i, layer in enumerate(self.layers):
            line = f"{layer:>5} {self.token_rank[i]:>9.4f} {self.token_rate[i]:>10.2f}"
            if self.cls_rank is not None and torch.isnan(self.cls_rank[i]):
                line += f" {'-':>9} {'-':>11}"
            elif self.cls_rank is not None:
                line += f" {self.cls_rank[i]:>9.4f} {self.cls_rate[i]:>11.2f}"
            lines.append(line)
        return "\n".join(lines)

    def plot(self, ax=None):
        """Plot identifiability by block (see :func:`visualize.plot_identifiability`)."""
        from .visualize import plot_identifiability

        return plot_identifiability(self, ax=ax)


@torch.no_grad()
def class_identifiability(
    model: torch.nn.Module | ViTAnatomy,
    inputs: torch.Tensor,
    labels: int | Sequence[int] | torch.Tensor,
    layers: int | Sequence[int] | str = "all",
    component: str = "residual",
    max_batch_size: int = 64,
    progress: bool = False,
) -> Identifiability:
    """Class identifiability of [CLS] and image tokens at each block, in one pass per chunk.

    [CLS] statistics are reported only for blocks whose tokens hold the [CLS] token that the
    head reads; every block's token count is checked against the patch grid.

    Args:
        model: A supported ViT, or its :class:`ViTAnatomy`.
        inputs: Normalised images (B, C, H, W).
        labels: Class per image (Captum target conventions).
        layers: Blocks to analyse (int, list of ints or ``"all"``).
        component: ``"residual"``, ``"attention"`` or ``"mlp"``.
        max_batch_size: Images per forward pass.
        progress: Show a progress bar.

    Returns:
        An :class:`Identifiability` result; ``print`` it or call ``.plot()``.

    Raises:
        UnsupportedModelError: If a block holds another number of tokens than its prefix
            tokens and the patch grid make.

    Example:
        >>> result = class_identifiability(model, images, labels)
        >>> result.layers, result.token_rate.shape  # one value per block
        ([0, 1, 2], torch.Size([3]))
    """
    anatomy = model if isinstance(model, ViTAnatomy) else ViTAnatomy.from_model(model)
    grid = check_inputs(inputs, anatomy)
    check_choice("component", component, ("residual", "attention", "mlp"))
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    blocks = anatomy.resolve_layers(layers)
    labels = check_target(labels, inputs.shape[0], anatomy.num_classes)
    if labels is None:
        raise ValueError("labels must be given (int, list of ints or int tensor), got None")
    cls = anatomy.readout.cls_index
    cls_blocks = [block for block in blocks if block in anatomy.cls_blocks]

    def summarise(component_: str, block: int, tokens: torch.Tensor) -> torch.Tensor:
        logits = anatomy.project(tokens).float()  # (b, N, C)
        chunk_labels = current_labels.to(logits.device)
        rank = normalized_rank(logits, chunk_labels)  # (b, N)
        top1 = (logits.argmax(-1) == chunk_labels[:, None]).float()
        image_rank, image_top1 = (anatomy.image_tokens(t, block, grid) for t in (rank, top1))
        # per image: [img rank, img rate, cls rank, cls top-1]; NaN where no [CLS] yet
        image = torch.stack([image_rank.mean(1), image_top1.mean(1) * 100], 1)
        if not cls_blocks:
            return image
        if block not in cls_blocks:
            return torch.cat([image, torch.full_like(image, torch.nan)], 1)
        return torch.cat([image, rank[:, cls, None], top1[:, cls, None] * 100], 1)

    totals = torch.zeros(len(blocks), 4 if cls_blocks else 2, dtype=torch.float64)
    starts = range(0, inputs.shape[0], max_batch_size)
    for start in tqdm(starts, desc="identifiability", disable=not progress):
        current_labels = labels[start : start + max_batch_size]
        with anatomy.capture([(component, b) for b in blocks], reduce=summarise) as cap:
            anatomy.forward(inputs[start : start + max_batch_size])
        for i, block in enumerate(blocks):
            totals[i] += cap.tokens[(component, block)].double().sum(0).cpu()
    means = (totals / inputs.shape[0]).float()
    return Identifiability(
        layers=blocks,
        token_rank=means[:, 0],
        token_rate=means[:, 1],
        cls_rank=means[:, 2] if cls_blocks else None,
        cls_rate=means[:, 3] if cls_blocks else None,
        num_images=int(inputs.shape[0]),
        component=component,
    )


__getattr__ = deprecated_aliases(__name__, {"SCORES": "TOKEN_SCORES"}, globals())
