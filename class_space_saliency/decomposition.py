"""Direct contributions: the target logit split exactly over blocks, heads and source tokens.

The final state that a ViT's head reads ([CLS], or the mean of the pooled tokens) is a sum: the
embedding (what enters block 0: patch, class and position embeddings), every block's attention
output and every block's MLP output. Each attention output splits further over heads ``h`` and
source tokens ``j``: ``sum_h sum_j A[h, cls, j] * ls * W_O^h (W_V^h a_j + b_V^h)``, ``a`` the
normalised tokens the attention reads, plus ``ls * b_O``. With the final norm's scale
(``1 / sigma``; CLIP also ``1 / |z|``) frozen at the actual state, the readout is affine, so
the target logit is the exact sum of one term per (block, head, token), one per MLP, the
embedding's and a bias (Gandelsman, Efros & Steinhardt, ICLR 2024, do this for CLIP).

Where each constant goes (``norm="frozen"``):

- ``attention[b, l, h, j]``: ``A`` times the value of token ``j`` *including the value bias*
  ``b_V`` (its share follows the attention weights), through ``W_O^h`` and layer scale;
- ``bias``: the head's bias, the final norm's shift ``beta`` carried through the head, and
  every block's ``ls * b_O`` (added to every token whatever it attends to);
- ``mlp[b, l]``: the whole MLP output (after layer scale) at the read state, biases included;
- ``embedding[b]``: the state entering block 0 (CLIP: after ``ln_pre``).

Pooled heads read the mean over tokens of the final states: the attention terms then weigh
source token ``j`` by its mean attention over the pooled query tokens. Models that normalise
each token before pooling (DINOv2's patch mean) are decomposed with one frozen scale per token.

Like TransformerLens's direct logit attribution (``ActivationCache.logit_attrs``,
``decompose_resid``, ``stack_head_results``) every part has a label: ``embed``, ``L3H7`` (block
3, head 7; per token ``L3H7.tok12``), ``L3.mlp``, ``bias``. Unlike it, and unlike ViT-Prisma's
per-head, per-query-position split, the split reaches each source token through [CLS], on
unmodified timm, torchvision, Hugging Face and open_clip models.

Memory: the result's attention terms are (B, blocks, heads, tokens): ViT-B/16 at 224 px keeps
28,368 floats per image (111 KiB). While it runs, the forward pass keeps every block's per-head
values (N x D floats per image and block: 7.3 MB per image for ViT-B/16, all blocks) and the
rows of the attention probabilities that the read states take (heads x N per block); the
recomputed norm adds one (heads, N, D) tensor per block and image at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._direct_paths import AttentionPath, attention_paths
from ._readout import LinearReadout, StateLayout, readout_of
from ._validation import TargetType, check_choice, check_inputs, check_target
from .adapters import UnsupportedModelError
from .anatomy import ViTAnatomy

NORM_MODES = ("frozen", "recomputed")
"""How the final norm treats each part:

- ``"frozen"``: the norm's scale (and CLIP's embedding norm) frozen at the actual read state;
  the readout is then affine and the parts sum exactly to the logit (attribution).
- ``"recomputed"``: every part is the vector it adds to the read state, scored by the model's
  own readout as if it were the whole state, ``head(norm(part))`` with the norm (and CLIP's
  L2 normalisation) recomputed on the part and the head's bias included: the paper's logit
  lens. The parts do not sum to the logit; ``bias`` is then the readout of the summed
  ``ls * b_O`` vectors. Models that normalise each pooled token before pooling (DINOv2,
  open_clip ``avg`` pooling) refuse it: each part would need scoring once per token.
"""

CHECK_TOLERANCE = 1e-3
"""Relative mismatch above which a model fails the runtime checks of exactness; models or
images in half precision get ten times their dtype's machine epsilon where that is larger."""


@dataclass
class Decomposition:
    """The target logit of a batch split into direct contributions.

    Attributes:
        attention: (B, blocks, heads, tokens) one term per block, head and source token
            (prefix tokens first: [CLS] is token 0 where the model has one).
        mlp: (B, blocks) one term per MLP.
        embedding: (B,) the embedding's term.
        bias: (B,) the constant terms (see the module docstring for what it holds).
        logit: (B,) the model's own logit of the target (minus that of ``baseline_target``).
        target: (B,) the explained classes.
        baseline_target: (B,) the subtracted classes, or ``None``.
        norm: ``"frozen"`` or ``"recomputed"`` (see :data:`NORM_MODES`).
        num_prefix_tokens: Tokens before the image tokens.
        grid: The patch grid (h, w) of the image tokens.
    """

    attention: torch.Tensor
    mlp: torch.Tensor
    embedding: torch.Tensor
    bias: torch.Tensor
    logit: torch.Tensor
    target: torch.Tensor
    baseline_target: torch.Tensor | None
    norm: str
    num_prefix_tokens: int
    grid: tuple[int, int]

    @property
    def num_blocks(self) -> int:
        """Number of blocks."""
        return self.attention.shape[1]

    @property
    def num_heads(self) -> int:
        """Heads per block."""
        return self.attention.shape[2]

    def total(self) -> torch.Tensor:
        """The sum of all parts (B,): the logit with ``norm="frozen"``."""
        return self.attention.sum((1, 2, 3)) + self.mlp.sum(1) + self.embedding + self.bias

    def head_terms(self) -> torch.Tensor:
        """Each head's term summed over its source tokens: (B, blocks, heads)."""
        return self.attention.sum(-1)

    def image_terms(self) -> torch.Tensor:
        """The image tokens' attention terms on the patch grid: (B, blocks, heads, h, w)."""
        return self.attention[..., self.num_prefix_tokens :].unflatten(-1, self.grid)

    def labels(self, tokens: bool = False) -> list[str]:
        """The parts' labels in the order of :meth:`parts`.

        Args:
            tokens: One part per (block, head, token) (``L3H7.tok12``) instead of per head.

        Example:
            >>> decompose(model, images, 0).labels()[:4]
            ['embed', 'L0H0', 'L0H1', 'L0.mlp']
        """
        names = ["embed"]
        for block in range(self.num_blocks):
            for head in range(self.num_heads):
                if tokens:
                    count = self.attention.shape[-1]
                    names.extend(f"L{block}H{head}.tok{j}" for j in range(count))
                else:
                    names.append(f"L{block}H{head}")
            names.append(f"L{block}.mlp")
        return [*names, "bias"]

    def parts(self, tokens: bool = False) -> torch.Tensor:
        """Every part as one column (B, parts), in the order of :meth:`labels`."""
        columns = [self.embedding[:, None]]
        for block in range(self.num_blocks):
            heads = self.attention[:, block]
            columns.append(heads.flatten(1) if tokens else heads.sum(-1))
            columns.append(self.mlp[:, block, None])
        columns.append(self.bias[:, None])
        return torch.cat(columns, 1)

    def top(
        self, k: int = 10, signed: bool = False, tokens: bool = False
    ) -> list[list[tuple[str, float]]]:
        """The ``k`` largest parts of each image, as ``(label, value)`` pairs.

        Args:
            k: Parts per image.
            signed: Rank by signed value (most positive first) instead of absolute value.
            tokens: Rank (block, head, token) parts instead of heads summed over tokens.

        Returns:
            One list per image, largest first.

        Example:
            >>> [label for label, _ in decompose(model, images, 0).top(2)[0]]
            ['bias', 'L2.mlp']
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        values, labels = self.parts(tokens), self.labels(tokens)
        keys = values if signed else values.abs()
        order = keys.argsort(dim=1, descending=True, stable=True)[:, :k]
        return [
            [(labels[i], float(values[row, i])) for i in order[row].tolist()]
            for row in range(values.shape[0])
        ]

    def to_dict(self) -> dict:
        """Plain-Python view (lists of floats) for JSON."""
        baseline = None if self.baseline_target is None else self.baseline_target.tolist()
        return dict(
            norm=self.norm,
            target=self.target.tolist(),
            baseline_target=baseline,
            logit=self.logit.tolist(),
            total=self.total().tolist(),
            num_prefix_tokens=self.num_prefix_tokens,
            grid=list(self.grid),
            labels=self.labels(),
            parts=self.parts().tolist(),
            attention=self.attention.tolist(),
        )

    def __str__(self) -> str:
        lines, top, total = [], self.top(5), self.total()
        for row in range(min(len(self.logit), 4)):
            versus = "" if self.baseline_target is None else f" - {int(self.baseline_target[row])}"
            lines.append(
                f"image {row}: logit[{int(self.target[row])}{versus}] = "
                f"{float(self.logit[row]):.4f}, sum of parts {float(total[row]):.4f} "
                f"({self.norm} norm)"
            )
            lines.extend(f"  {label:>12} {value:+.4f}" for label, value in top[row])
        if len(self.logit) > 4:
            lines.append(f"... {len(self.logit) - 4} more images")
        return "\n".join(lines)


@dataclass(frozen=True)
class DirectPaths:
    """Everything :func:`decompose` reads of a model: its readout and attention paths."""

    anatomy: ViTAnatomy
    readout: LinearReadout
    attention: tuple[AttentionPath, ...]

    @classmethod
    def of(cls, anatomy: ViTAnatomy) -> DirectPaths:
        """The model's paths, read from its current weights.

        Raises:
            UnsupportedModelError: Where the decomposition would not be exact, naming why.
        """
        attention = tuple(attention_paths(anatomy))  # refuses unknown blocks first
        return cls(anatomy, readout_of(anatomy), attention)

    @property
    def num_heads(self) -> int:
        """Heads per block."""
        return self.attention[0].num_heads


def decomposition_paths(model: nn.Module | ViTAnatomy) -> DirectPaths:
    """The :class:`DirectPaths` of ``model``, or ``UnsupportedModelError`` with the reason.

    Example:
        >>> decomposition_paths(model).num_heads
        2
    """
    anatomy = model if isinstance(model, ViTAnatomy) else ViTAnatomy.from_model(model)
    return DirectPaths.of(anatomy)


@torch.no_grad()
def decompose(
    model: nn.Module | ViTAnatomy,
    images: torch.Tensor,
    target: TargetType = None,
    *,
    baseline_target: TargetType = None,
    norm: str = "frozen",
) -> Decomposition:
    """Split the target logit of each image into direct contributions (one forward pass).

    Args:
        model: A supported ViT (timm ViT/DeiT/BEiT/EVA, torchvision, Hugging Face
            ViT/DeiT/BEiT/DINOv2, open_clip zero-shot), or its :class:`ViTAnatomy`.
        images: Normalised images (B, C, H, W).
        target: Class per image (Captum conventions); ``None``: the predicted class.
        baseline_target: Decompose ``logit[target] - logit[baseline_target]`` instead.
        norm: ``"frozen"`` (exact, default) or ``"recomputed"`` (see :data:`NORM_MODES`).

    Returns:
        A :class:`Decomposition` on the images' device.

    Raises:
        UnsupportedModelError: For a model on which the split would not be exact (post-norm
            blocks, a nonlinear head, an unknown final norm), naming the reason.
        ValueError: For bad images or targets, or an unknown ``norm``.

    Example:
        >>> parts = decompose(model, images, target=labels)
        >>> parts.attention.shape  # (B, blocks, heads, tokens incl. [CLS])
        torch.Size([3, 3, 2, 17])
        >>> torch.allclose(parts.total(), model(images)[torch.arange(3), labels], atol=1e-5)
        True
        >>> parts.top(3)[0][0][0]  # the largest part of image 0, by absolute value
        'L0.mlp'
    """
    check_choice("norm", norm, NORM_MODES)
    paths = decomposition_paths(model)
    grid = check_inputs(images, paths.anatomy)
    classes = paths.anatomy.num_classes
    targets = check_target(target, images.shape[0], classes)
    baseline = check_target(baseline_target, images.shape[0], classes)
    return decompose_with(paths, images, grid, targets, baseline, norm)


@torch.no_grad()
def decompose_with(
    paths: DirectPaths,
    images: torch.Tensor,
    grid: tuple[int, int],
    target: torch.Tensor | None,
    baseline_target: torch.Tensor | None = None,
    norm: str = "frozen",
) -> Decomposition:
    """:func:`decompose` on validated inputs, with the model's paths read beforehand."""
    if norm == "recomputed" and paths.readout.norms_each_token:
        raise UnsupportedModelError(
            f"norm='recomputed' scores every part through the readout on its own, but "
            f"{type(paths.anatomy.model).__name__} normalises each pooled token before "
            "pooling, which would score each part once per token; use norm='frozen'"
        )
    captured = _capture(paths, images)
    logits = captured.logits
    target = logits.argmax(-1) if target is None else target.to(images.device)
    direction = F.one_hot(target, logits.shape[-1]).to(captured.dtype)
    if baseline_target is not None:
        baseline_target = baseline_target.to(images.device)
        direction = direction - F.one_hot(baseline_target, logits.shape[-1]).to(captured.dtype)
    _check_exact(paths, captured)
    parts = _frozen if norm == "frozen" else _recomputed
    attention, mlp, embedding, bias = parts(paths, captured, direction)
    return Decomposition(
        attention=attention,
        mlp=mlp,
        embedding=embedding,
        bias=bias,
        logit=(direction * logits.to(captured.dtype)).sum(-1),
        target=target,
        baseline_target=baseline_target,
        norm=norm,
        num_prefix_tokens=paths.anatomy.num_prefix_tokens,
        grid=grid,
    )


@dataclass
class _Captured:
    """What one forward pass gives the decomposition, at the read states (S of them)."""

    logits: torch.Tensor  # (B, C) the model's output
    precision: torch.dtype  # the lowest floating-point precision of the model and images
    layout: StateLayout
    embedding: torch.Tensor  # (B, S, D)
    final: torch.Tensor  # (B, S, D)
    mlp: list[torch.Tensor]  # per block (B, S, D)
    probabilities: list[torch.Tensor]  # per block (B, H, S, N): attention of the read states
    values: list[torch.Tensor]  # per block (B, H, N, d)

    @property
    def dtype(self) -> torch.dtype:
        return self.final.dtype


def _capture(paths: DirectPaths, images: torch.Tensor) -> _Captured:
    anatomy = paths.anatomy
    depth = anatomy.depth
    dtype = torch.promote_types(images.dtype, torch.float32)
    layouts: dict[int, StateLayout] = {}

    def layout(num_tokens: int) -> StateLayout:
        if num_tokens not in layouts:
            layouts[num_tokens] = paths.readout.layout(num_tokens, images.device)
        return layouts[num_tokens]

    def reduce(kind: str, block: int, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(dtype)
        if kind == "attention_input":
            return paths.attention[block].values(tensor)
        if kind == "probabilities":  # (B, H, N, N) -> rows of the read states (B, H, S, N)
            return torch.matmul(layout(tensor.shape[-1]).weights.to(dtype), tensor)
        return layout(tensor.shape[1]).gather(tensor)

    blocks = range(depth)
    with anatomy.capture(
        [("mlp", b) for b in blocks] + [("residual", depth - 1)],
        attention=list(blocks),
        reduce=reduce,
        inputs=[("block", 0)] + [("attention", b) for b in blocks],
    ) as cap:
        cap.output = anatomy.forward(images)
    values = [cap.inputs[("attention", b)] for b in blocks]
    parameter = next(anatomy.model.parameters(), images)
    precision = min((images.dtype, parameter.dtype), key=lambda d: torch.finfo(d).bits)
    return _Captured(
        logits=cap.output.detach(),
        precision=precision,
        layout=layout(values[0].shape[2]),
        embedding=cap.inputs[("block", 0)],
        final=cap.tokens[("residual", depth - 1)],
        mlp=[cap.tokens[("mlp", b)] for b in blocks],
        probabilities=[cap.attention[b] for b in blocks],
        values=values,
    )


def _attention_outputs(path: AttentionPath, probabilities, values) -> torch.Tensor:
    """One block's attention output at the read states (B, S, D), from its heads."""
    mixed = torch.matmul(probabilities, values)  # (B, H, S, d)
    out = torch.einsum("bhsd,hed->bse", mixed, path.out_per_head(values.dtype))
    constant = path.constant(values.dtype)
    return out if constant is None else out + constant


def _check_exact(paths: DirectPaths, captured: _Captured) -> None:
    """Refuse where the captured model does not add up as the decomposition assumes.

    Two checks, each against the model's own numbers: the final states are the embedding
    plus every attention output (rebuilt from heads and values) plus every MLP output, and
    the readout of the final states reproduces the model's logits.
    """
    model = type(paths.anatomy.model).__name__
    tolerance = max(CHECK_TOLERANCE, 10 * torch.finfo(captured.precision).eps)
    rebuilt = captured.embedding + sum(captured.mlp)
    for path, probabilities, values in zip(
        paths.attention, captured.probabilities, captured.values, strict=True
    ):
        rebuilt = rebuilt + _attention_outputs(path, probabilities, values)
    final = captured.final
    mismatch = float((rebuilt - final).norm() / final.norm().clamp_min(1e-12))
    if not mismatch <= tolerance:
        raise UnsupportedModelError(
            f"the blocks of {model} do not add embedding, attention and MLP outputs into the "
            f"state the head reads (relative mismatch {mismatch:.2e}); the decomposition "
            "would not be exact"
        )
    logits = captured.logits.to(captured.dtype)
    reproduced = paths.readout.logits(final, captured.layout)
    scale = float(logits.abs().max().clamp_min(1.0))
    mismatch = float((reproduced - logits).abs().max()) / scale
    if not mismatch <= tolerance:
        raise UnsupportedModelError(
            f"the readout of {model} ({paths.readout.describe}) is not reproduced from its "
            f"final states (relative mismatch {mismatch:.2e}); the decomposition would not be "
            "exact"
        )


def _frozen(
    paths: DirectPaths, captured: _Captured, direction: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Parts with the readout's scales frozen at the actual states: they sum to the logit."""
    grad, constant = paths.readout.linearize(captured.final, direction, captured.layout)
    bias, heads, mlp = constant, [], []
    for path, probabilities, values, block_mlp in zip(
        paths.attention, captured.probabilities, captured.values, captured.mlp, strict=True
    ):
        # each head's output direction at each state: W_O^h^T (ls * grad_s) -> (B, H, S, d)
        pulled = torch.einsum("bse,hed->bhsd", grad, path.out_per_head(grad.dtype))
        scores = torch.matmul(pulled, values.transpose(-1, -2))  # (B, H, S, N)
        heads.append((probabilities * scores).sum(2))
        mlp.append((grad * block_mlp).sum((1, 2)))
        shift = path.constant(grad.dtype)
        if shift is not None:  # ls * b_O reaches every read state in full
            bias = bias + grad.sum(1) @ shift
    embedding = (grad * captured.embedding).sum((1, 2))
    return torch.stack(heads, 1), torch.stack(mlp, 1), embedding, bias


def _recomputed(
    paths: DirectPaths, captured: _Captured, direction: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Parts scored one by one through the model's readout, nothing frozen (logit lens)."""
    readout, layout = paths.readout, captured.layout

    def score(vectors: torch.Tensor) -> torch.Tensor:  # (B, ..., S, D) -> (B, ...)
        logits = readout.logits(vectors, layout)
        weights = direction.reshape(direction.shape[0], *[1] * (logits.dim() - 2), -1)
        return (logits * weights).sum(-1)

    heads, mlp, shift = [], [], torch.zeros_like(captured.final[0, 0])
    for path, probabilities, values, block_mlp in zip(
        paths.attention, captured.probabilities, captured.values, captured.mlp, strict=True
    ):
        # each (head, token)'s vector: A[h, s, j] * ls * W_O^h v_j -> (B, H, N, S, D)
        per_token = torch.einsum("bhnd,hed->bhne", values, path.out_per_head(values.dtype))
        vectors = probabilities.transpose(-1, -2)[..., None] * per_token[:, :, :, None, :]
        heads.append(score(vectors))
        mlp.append(score(block_mlp))
        constant = path.constant(values.dtype)
        if constant is not None:
            shift = shift + constant
    bias = score(shift.expand_as(captured.final))
    return torch.stack(heads, 1), torch.stack(mlp, 1), score(captured.embedding), bias
