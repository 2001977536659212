"""The classifier readout of a ViT as an affine map of its final token states.

Every family that :func:`~class_space_saliency.decomposition.decompose` supports reads its
logits from the final token states ``X`` (N, D) as::

    logits = final( sum_s alpha_s * (W_s @ norm(state_s) + b_s) ),   state_s = omega_s @ X

- a *read state* ``omega_s @ X`` is one token ([CLS], DeiT's distillation token) or the mean of
  the pooled tokens. A model that normalises every token before it pools (DINOv2's patch mean,
  timm average pooling without ``fc_norm``, open_clip average pooling without
  ``final_ln_after_pool``) reads each pooled token as a state of its own, ``alpha = 1 / n``;
- ``norm`` is the final norm chain (LayerNorm, RMSNorm, or nothing), applied to each state;
- ``W_s, b_s`` is the head that reads the state (DeiT distilled: ``head`` on [CLS] and
  ``head_dist`` on the distillation token, ``alpha = 1/2`` each; DINOv2: the [CLS] and patch
  halves of ``classifier``; CLIP: the visual projection ``proj``, no bias);
- ``final`` is the identity, or CLIP's ``logit_scale.exp() * cos(z, prompt)``.

With every scale frozen at the actual states (LayerNorm's ``1/sigma``, RMSNorm's ``1/rms``,
CLIP's ``1/|z|``) the readout is affine in ``X``: :meth:`LinearReadout.linearize` pulls a
direction in class space back to one vector per read state, plus a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import UnsupportedModelError, timm_eva, timm_vit, torchvision_vit
from .adapters import clip as clip_adapter
from .adapters import hf as hf_adapter
from .anatomy import ViTAnatomy

RMS_NORMS = ("RMSNorm", "RmsNorm", "RmsNormFp32")
"""Class names of the RMS norms (torch, timm) read as ``x / rms(x) * weight``."""


@dataclass(frozen=True)
class FinalNorm:
    """A LayerNorm (``centred``) or RMSNorm over the last dimension, as tensors.

    Attributes:
        centred: Subtract the mean first (LayerNorm); RMSNorm does not.
        weight: The scale ``gamma`` (D,), or ``None``.
        bias: The shift ``beta`` (D,), or ``None``.
        eps: Added to the variance (mean square) before the square root; ``None``: the
            machine epsilon of the input's dtype (``torch.nn.RMSNorm``'s default).
    """

    centred: bool
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float | None

    @classmethod
    def of(cls, module: nn.Module | None) -> FinalNorm | None:
        """The norm computed by ``module``; ``None`` for no norm (``None``, ``nn.Identity``).

        Raises:
            UnsupportedModelError: For any other module (its scale could not be frozen).
        """
        if module is None or isinstance(module, nn.Identity):
            return None
        rms = type(module).__name__ in RMS_NORMS
        if not (rms or isinstance(module, nn.LayerNorm)):
            raise UnsupportedModelError(
                f"the final norm is a {type(module).__name__}; the decomposition freezes the "
                f"scale of LayerNorm and RMSNorm ({', '.join(RMS_NORMS)}) only"
            )
        if len(module.normalized_shape) != 1:
            raise UnsupportedModelError(
                f"the final norm {module} normalises over {tuple(module.normalized_shape)}, "
                "not over the last dimension only"
            )
        return cls(not rms, module.weight, getattr(module, "bias", None), module.eps)

    def inverse_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``1 / sigma`` (LayerNorm) or ``1 / rms`` (RMSNorm) of ``x`` (..., D) -> (..., 1)."""
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if self.centred:
            return torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def apply(self, x: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of ``x``, with its scale ``inverse`` frozen where given."""
        inverse = self.inverse_scale(x) if inverse is None else inverse
        y = (x - x.mean(-1, keepdim=True) if self.centred else x) * inverse
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def pull_back(
        self, grad: torch.Tensor, inverse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen-scale norm's gradient ``grad`` (..., D) at its output, at its input.

        Returns:
            ``(gradient at the input (..., D), <grad, beta> (...))``.
        """
        constant = (grad * self.bias.to(grad.dtype)).sum(-1) if self.bias is not None else 0
        if self.weight is not None:
            grad = grad * self.weight.to(grad.dtype)
        if self.centred:
            grad = grad - grad.mean(-1, keepdim=True)
        return grad * inverse, constant


@dataclass(frozen=True)
class HeadRead:
    """A linear head and the state it reads.

    Attributes:
        weight: (K, D): K classes, or CLIP's embedding width.
        bias: (K,) or ``None``.
        token: The token read; ``None`` for a pooled read.
        pool_start: A pooled read averages the tokens from this one on.
        norm_each: A pooled read normalises every token before averaging (one read state
            per token), instead of normalising the average.
        share: Weight of this head's output in the logits (DeiT distilled: 1/2).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    token: int | None = None
    pool_start: int | None = None
    norm_each: bool = False
    share: float = 1.0

    def state_rows(self, num_tokens: int) -> tuple[list[list[int]], float]:
        """Token rows averaged into each read state, and each state's ``alpha``."""
        if self.token is not None:
            return [[self.token]], self.share
        pooled = list(range(self.pool_start, num_tokens))
        if self.norm_each:
            return [[row] for row in pooled], self.share / len(pooled)
        return [pooled], self.share


@dataclass(frozen=True)
class StateLayout:
    """Read states of a sequence of N tokens.

    Attributes:
        weights: (S, N): row ``s`` averages the tokens of read state ``s``.
        alphas: (S,) the factor of each state's head output.
        spans: ``(start, stop)`` of each read's states, in the order of ``LinearReadout.reads``.
    """

    weights: torch.Tensor
    alphas: torch.Tensor
    spans: tuple[tuple[int, int], ...]

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """The read states (B, S, D) of token states (B, N, D)."""
        return torch.matmul(self.weights.to(tokens.dtype), tokens)


@dataclass(frozen=True)
class LinearReadout:
    """``final(sum_s alpha_s (W_s norm(omega_s X) + b_s))``: a family's readout as tensors.

    Attributes:
        norms: The final norm chain, applied to every read state in order.
        reads: The heads and the states they read.
        prompts: CLIP: normalised prompt embeddings (C, E); ``None`` for a linear head.
        logit_scale: CLIP: the log temperature.
        describe: What the readout is, in words.
    """

    norms: tuple[FinalNorm, ...]
    reads: tuple[HeadRead, ...]
    prompts: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    describe: str = ""

    @property
    def norms_each_token(self) -> bool:
        """Whether a pooled read normalises every pooled token on its own."""
        return any(read.token is None and read.norm_each for read in self.reads)

    def layout(self, num_tokens: int, device: torch.device) -> StateLayout:
        """The read states of a sequence of ``num_tokens`` tokens."""
        rows, alphas, spans = [], [], []
        for read in self.reads:
            states, alpha = read.state_rows(num_tokens)
            spans.append((len(rows), len(rows) + len(states)))
            rows.extend(states)
            alphas.extend([alpha] * len(states))
        weights = torch.zeros(len(rows), num_tokens, dtype=torch.float64)
        for state, members in enumerate(rows):
            weights[state, members] = 1.0 / len(members)
        return StateLayout(
            weights.to(device),
            torch.tensor(alphas, dtype=torch.float64, device=device),
            tuple(spans),
        )

    def _mix(self, normed: torch.Tensor, layout: StateLayout) -> torch.Tensor:
        """``sum_s alpha_s (W_s y_s + b_s)`` of normalised states (..., S, D) -> (..., K)."""
        total = 0
        for read, (start, stop) in zip(self.reads, layout.spans, strict=True):
            alphas = layout.alphas[start:stop, None].to(normed.dtype)
            bias = None if read.bias is None else read.bias.to(normed.dtype)
            heads = F.linear(normed[..., start:stop, :], read.weight.to(normed.dtype), bias)
            total = total + (alphas * heads).sum(-2)
        return total

    def logits(self, states: torch.Tensor, layout: StateLayout) -> torch.Tensor:
        """The model's readout of read states (..., S, D): logits (..., C), nothing frozen."""
        for norm in self.norms:
            states = norm.apply(states)
        mixed = self._mix(states, layout)
        if self.prompts is None:
            return mixed
        scale = self.logit_scale.exp().to(mixed.dtype)
        return scale * F.normalize(mixed, dim=-1) @ self.prompts.to(mixed.dtype).T

    def linearize(
        self, states: torch.Tensor, direction: torch.Tensor, layout: StateLayout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The readout with every scale frozen at ``states``, as an affine map.

        Args:
            states: The actual read states (B, S, D).
            direction: Class weights (B, C): the logit read is ``direction @ logits``.
            layout: The read states' layout.

        Returns:
            ``(grad, constant)``: (B, S, D) and (B,) with
            ``direction @ logits = sum_s <grad_s, states_s> + constant`` at ``states``, and
            for any states whose every scale equals the frozen one.
        """
        inverses = []
        for norm in self.norms:
            inverses.append(norm.inverse_scale(states))
            states = norm.apply(states, inverses[-1])
        if self.prompts is None:
            pulled = direction.to(states.dtype)
        else:  # CLIP: scale * <prompt, z> / |z| with |z| frozen
            mixed = self._mix(states, layout)
            scale = self.logit_scale.exp().to(states.dtype)
            prompts = direction.to(states.dtype) @ self.prompts.to(states.dtype)
            pulled = scale * prompts / mixed.norm(dim=-1, keepdim=True)
        grad = torch.empty_like(states)
        constant = torch.zeros(states.shape[0], dtype=states.dtype, device=states.device)
        for read, (start, stop) in zip(self.reads, layout.spans, strict=True):
            alphas = layout.alphas[start:stop, None].to(states.dtype)
            grad[:, start:stop] = alphas * (pulled @ read.weight.to(states.dtype))[:, None]
            if read.bias is not None:
                constant = constant + read.share * (pulled @ read.bias.to(states.dtype))
        for norm, inverse in zip(reversed(self.norms), reversed(inverses), strict=True):
            grad, shift = norm.pull_back(grad, inverse)
            constant = constant + (shift.sum(-1) if torch.is_tensor(shift) else shift)
        return grad, constant


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _linear(head: nn.Module, owner: str) -> nn.Linear:
    """``head`` if it is an ``nn.Linear`` (torchvision: its only layer), else refuse."""
    if isinstance(head, nn.Sequential) and len(head) == 1:
        head = head[0]
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"the head of {owner} is a {type(head).__name__}, not one linear layer (a "
            "pre-logits layer with a nonlinearity, for example): the logit is not linear in "
            "the normalised state"
        )
    return head


def _family_norms_and_heads(anatomy: ViTAnatomy) -> tuple[nn.Module, nn.Module, list, str]:
    """``(norm before pooling, norm after pooling, heads, what the head is)`` of a family."""
    model, family = anatomy.model, anatomy.family
    owner = type(model).__name__
    if family in (timm_vit.NAME, timm_eva.NAME):
        heads = [_linear(head, owner) for head in anatomy.heads]
        return model.norm, getattr(model, "fc_norm", None), heads, "linear"
    if family == torchvision_vit.NAME:
        return model.encoder.ln, None, [_linear(model.heads, owner)], "linear"
    if family == hf_adapter.NAME:
        base = model.base_model
        after = getattr(getattr(base, "pooler", None), "layernorm", None)
        if isinstance(anatomy.heads[0], hf_adapter.ConcatHead):
            return base.layernorm, after, [_linear(anatomy.heads[0].classifier, owner)], "concat"
        return base.layernorm, after, [_linear(head, owner) for head in anatomy.heads], "linear"
    if family == clip_adapter.NAME:
        ln_post = model.clip.visual.ln_post
        if getattr(model.clip.visual, "final_ln_after_pool", False):
            return None, ln_post, [anatomy.heads[0]], "clip"
        return ln_post, None, [anatomy.heads[0]], "clip"
    raise UnsupportedModelError(
        f"the direct decomposition knows the readout of timm ViT/DeiT/BEiT/EVA, torchvision, "
        f"Hugging Face ViT/DeiT/BEiT/DINOv2 and open_clip models; {owner} is "
        f"{family!r}, whose final norm and head it cannot vouch for"
    )


def readout_of(anatomy: ViTAnatomy) -> LinearReadout:
    """The readout of a supported model as a :class:`LinearReadout`.

    Raises:
        UnsupportedModelError: For a family whose readout is not affine once the norm scales
            are frozen (a nonlinear head, norms before and after pooling, an unknown norm),
            naming the reason.

    Example:
        >>> readout = readout_of(ViTAnatomy.from_model(model))
        >>> len(readout.reads), readout.reads[0].token  # the head reads [CLS]
        (1, 0)
    """
    before, after, heads, kind = _family_norms_and_heads(anatomy)
    rows, pool = anatomy.readout.cls_rows, anatomy.readout.pool_start
    owner = type(anatomy.model).__name__
    pooled_each = not _is_identity(before)
    if pool is not None and pooled_each and not _is_identity(after):
        raise UnsupportedModelError(
            f"{owner} normalises its tokens before and after pooling; the decomposition "
            "supports one final norm around the pooling"
        )
    prompts = logit_scale = None
    if kind == "clip":
        head = heads[0]
        prompts, logit_scale = head.prompts, head.logit_scale
        token = rows[0] if pool is None else None
        each = pooled_each and pool is not None
        reads = [HeadRead(head.proj.T, None, token, pool, norm_each=each)]
    elif kind == "concat":  # DINOv2: classifier([norm(x_cls) ; mean_i norm(x_i)])
        weight, bias = heads[0].weight, heads[0].bias
        width = weight.shape[1] // 2
        reads = [
            HeadRead(weight[:, :width], bias, token=rows[0]),
            HeadRead(weight[:, width:], None, pool_start=pool, norm_each=pooled_each),
        ]
    elif pool is None and len(rows) == len(heads):  # [CLS]; DeiT: [CLS] and distillation
        reads = [
            HeadRead(head.weight, head.bias, token=row, share=1 / len(heads))
            for row, head in zip(rows, heads, strict=True)
        ]
    elif not rows and len(heads) == 1:
        head = heads[0]
        reads = [HeadRead(head.weight, head.bias, pool_start=pool, norm_each=pooled_each)]
    else:
        raise UnsupportedModelError(
            f"{owner} reads {anatomy.readout.describe()} with {len(heads)} head(s); the "
            "decomposition knows one head per read token, or one head on a pooled mean"
        )
    norms = tuple(norm for norm in (FinalNorm.of(before), FinalNorm.of(after)) if norm is not None)
    return LinearReadout(norms, tuple(reads), prompts, logit_scale, anatomy.readout.describe())
