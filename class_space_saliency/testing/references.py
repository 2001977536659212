"""Plain-torch reference computations: a hand-written ViT forward and every method by hand.

Nothing here calls the library's methods, adapters or anatomy: each function re-computes
what a method should return from the model's submodules, so a test can compare the two.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from torch import nn


class BlockStates(NamedTuple):
    """What one transformer block computes (all (B, N, D) except ``probs``)."""

    output: torch.Tensor
    """The residual stream after the block."""
    attention: torch.Tensor
    """The attention branch added to the stream (after layer scale)."""
    mlp: torch.Tensor
    """The MLP branch added to the stream (after layer scale)."""
    probs: torch.Tensor
    """Attention probabilities (B, heads, N, N)."""
    normed: torch.Tensor
    """The attention's input: the block's first norm applied to the incoming stream."""


def attention_by_hand(
    attn: nn.Module,
    h: torch.Tensor,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 1,
    leaf_probs: bool = False,
    edit_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timm attention module (ViT, DeiT, BEiT, EVA, relative-position ViT) by hand.

    Args:
        attn: the block's ``attn`` module.
        h: its input (B, N, D).
        rope: EVA-02's rotary embedding of the image tokens, or None.
        num_prefix_tokens: tokens in front of the image tokens (not rotated).
        leaf_probs: make the probabilities a new autograd leaf (for block-local gradients).
        edit_probs: replaces the probabilities before they weigh the values (knock-outs).

    Returns:
        ``(probs, out)``: probabilities (B, heads, N, N), edited if ``edit_probs`` is given,
        and the projected output (B, N, D).
    """
    from timm.layers import apply_rot_embed_cat

    b, n, d = h.shape
    if getattr(attn, "qkv", None) is None:  # EVA with separate q, k, v projections
        q, k, v = (
            proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
    else:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:  # BEiT / EVA: separate q and v biases
            bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
            if getattr(attn, "qkv_bias_separate", False) and attn.qkv.bias is not None:
                bias = bias + attn.qkv.bias
        qkv = F.linear(h, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if getattr(attn, "relative_position_bias_table", None) is not None:  # BEiT
        scores = scores + attn._get_rel_pos_bias()
    if getattr(attn, "rel_pos", None) is not None:  # relative-position ViT: adds its bias
        scores = attn.rel_pos(scores)
    probs = scores.softmax(-1)
    if leaf_probs:
        probs = probs.detach().requires_grad_(True)
    if edit_probs is not None:
        probs = edit_probs(probs)
    out = getattr(attn, "norm", nn.Identity())((probs @ v).transpose(1, 2).reshape(b, n, d))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    return probs, attn.proj(out)


def _layer_scaled(block: nn.Module, number: int, value: torch.Tensor) -> torch.Tensor:
    """Layer scale: BEiT/EVA/CaiT ``gamma_k``, XCiT ``gammak`` parameters or timm ``ls_k``."""
    gamma = getattr(block, f"gamma_{number}", getattr(block, f"gamma{number}", None))
    if gamma is not None:
        return gamma * value
    return getattr(block, f"ls{number}", nn.Identity())(value)


POST_NORM_BLOCKS = ("ResPostBlock", "ResPostRelPosBlock", "EvaBlockPostNorm")
"""timm blocks that normalise each branch's output: ``x + norm1(attn(x))``,
``x + norm2(mlp(x))`` (the paper's GAP model ``vit_base_patch16_rpn_224`` has them)."""


def block_by_hand(
    block: nn.Module,
    x: torch.Tensor,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 1,
    normed: torch.Tensor | None = None,
    leaf_probs: bool = False,
    own_attention: bool = False,
    grid: tuple[int, int] | None = None,
    edit_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> BlockStates:
    """One timm transformer block by hand: pre-norm (``x + ls1(attn(norm1(x)))``, then the
    MLP alike) or post-norm (:data:`POST_NORM_BLOCKS`: ``x + norm1(attn(x))``, then
    ``x + norm2(mlp(x))``), with layer scale; XCiT's third branch (``x +
    gamma3 * local_mp(norm3(x))``) between attention and MLP.

    Args:
        block: a block of ``model.blocks``.
        x: the incoming residual stream (B, N, D).
        rope: see :func:`attention_by_hand`.
        num_prefix_tokens: see :func:`attention_by_hand`.
        normed: use this as the attention's input instead of ``block.norm1(x)`` (``x`` for
            post-norm blocks): a leaf for Grad-CAM.
        leaf_probs: see :func:`attention_by_hand`.
        own_attention: call the block's attention module instead of computing it by hand
            (attention kinds :func:`attention_by_hand` does not know: ConViT's gated
            positional, CaiT's talking heads, XCiT's cross-covariance); ``probs`` is None.
        grid: the patch grid (h, w) (XCiT's local patch interaction needs it).
        edit_probs: see :func:`attention_by_hand`.

    Returns:
        The block's :class:`BlockStates` (``normed``: the attention's input).
    """
    post_norm = type(block).__name__ in POST_NORM_BLOCKS
    if normed is None:
        normed = x if post_norm else block.norm1(x)
    if own_attention:
        probs = None
        out = block.attn(normed) if rope is None else block.attn(normed, rope=rope)
    else:
        probs, out = attention_by_hand(
            block.attn, normed, rope, num_prefix_tokens, leaf_probs, edit_probs
        )
    attention = block.norm1(out) if post_norm else _layer_scaled(block, 1, out)
    x = x + attention
    if hasattr(block, "local_mp"):  # XCiT: local patch interaction on the grid
        x = x + _layer_scaled(block, 3, block.local_mp(block.norm3(x), *grid))
    mlp = (
        block.norm2(block.mlp(x))
        if post_norm
        else _layer_scaled(block, 2, block.mlp(block.norm2(x)))
    )
    return BlockStates(x + mlp, attention, mlp, probs, normed)


def embed_by_hand(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token sequence a timm ViT / DeiT / BEiT / EVA-02 feeds its first block.

    Returns:
        ``(tokens, rope)``: (B, N, D) and EVA-02's rotary embedding (None for the others).
    """
    from timm.models.beit import Beit
    from timm.models.eva import Eva

    x = model.patch_embed(images)
    rope = None
    if isinstance(model, Beit):
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], 1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
    elif isinstance(model, Eva):
        x, rope = model._pos_embed(x)
    else:
        x = model._pos_embed(x)
    return getattr(model, "norm_pre", nn.Identity())(x), rope


def token_states(
    model: nn.Module,
    images: torch.Tensor,
    leaf_block: int | None = None,
    edit_probs: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Token states of every block, recomputed by hand from the model's submodules.

    Works for timm ViT, DeiT, BEiT and EVA models (pre-norm and post-norm blocks) and
    ``torchvision`` ViTs. Runs with
    autograd on unless the caller disables it.

    Args:
        model: the ViT.
        images: (B, 3, H, W).
        leaf_block: timm only: the block whose attention input becomes a new autograd leaf
            (returned as ``"leaf"``), for Grad-CAM references: ``norm1(x)`` of a pre-norm
            block; the incoming stream ``x`` itself of a post-norm block (it enters both
            the attention and the residual path).
        edit_probs: timm only: ``f(block, probs) -> probs`` replaces each block's attention
            probabilities before they weigh the values (knock-out references).

    Returns:
        ``{"residual", "attention", "mlp", "attn_probs"}``: lists over blocks of (B, N, D)
        tensors (``attn_probs``: (B, heads, N, N)); ``"leaf"``: [the leaf] or [].

    Example:
        >>> from class_space_saliency.testing import tiny_images, tiny_vit
        >>> model, images = tiny_vit("plain"), tiny_images("plain")
        >>> states = token_states(model, images)
        >>> logits = model.forward_head(model.norm(states["residual"][-1]))
        >>> torch.allclose(logits, model(images), atol=1e-5)
        True
    """
    states: dict[str, list[torch.Tensor]] = {
        key: [] for key in ("residual", "attention", "mlp", "attn_probs", "leaf")
    }
    if isinstance(model, torchvision.models.VisionTransformer):
        if leaf_block is not None or edit_probs is not None:
            raise ValueError("leaf_block and edit_probs are only supported for timm models")
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + model.encoder.pos_embedding
        for layer in model.encoder.layers:
            h = layer.ln_1(x)
            attn, probs = layer.self_attention(
                h, h, h, need_weights=True, average_attn_weights=False
            )
            x = x + attn
            mlp = layer.mlp(layer.ln_2(x))
            x = x + mlp
            for key, value in zip(states, (x, attn, mlp, probs), strict=False):
                states[key].append(value)
        return states
    x, rope = embed_by_hand(model, images)
    npt = model.num_prefix_tokens
    for i, block in enumerate(model.blocks):
        normed = None
        if i == leaf_block and type(block).__name__ in POST_NORM_BLOCKS:
            x = x.detach().requires_grad_(True)
            states["leaf"].append(x)
        elif i == leaf_block:
            normed = block.norm1(x).detach().requires_grad_(True)
            states["leaf"].append(normed)
        edit = None if edit_probs is None else partial(edit_probs, i)
        out = block_by_hand(block, x, rope, npt, normed, edit_probs=edit)
        x = out.output
        for key, value in zip(states, (x, out.attention, out.mlp, out.probs), strict=False):
            states[key].append(value)
    return states


def num_prefix_tokens_of(model: nn.Module) -> int:
    """Tokens in front of the image tokens: torchvision's [CLS], timm's ``num_prefix_tokens``."""
    if isinstance(model, torchvision.models.VisionTransformer):
        return 1
    return model.num_prefix_tokens


def class_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token class logits head(norm(tokens)), by hand.

    timm: ``norm`` -> ``fc_norm`` -> ``head`` (DeiT distilled: both heads averaged);
    torchvision: ``encoder.ln`` -> ``heads``.

    Args:
        model: the ViT.
        tokens: (..., D) token states.

    Returns:
        (..., C) logits.
    """
    if isinstance(model, torchvision.models.VisionTransformer):
        return model.heads(model.encoder.ln(tokens))
    normed = model.fc_norm(model.norm(tokens))
    if hasattr(model, "head_dist"):
        return (model.head(normed) + model.head_dist(normed)) / 2
    return model.head(normed)


def grid_of(images: torch.Tensor, patch: int | tuple[int, int]) -> tuple[int, int]:
    """The patch grid (h, w) of ``images`` for a patch size."""
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return images.shape[-2] // ph, images.shape[-1] // pw


def class_space_map_by_hand(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    block: int,
    grid: tuple[int, int],
    component: str = "residual",
    score: str = "logit",
) -> torch.Tensor:
    """The class-space map of one block: the target's score of every image token.

    Args:
        model: a timm or torchvision ViT.
        images: (B, 3, H, W).
        target: (B,) class indices.
        block: block index.
        grid: the patch grid (h, w).
        component: ``"residual"``, ``"attention"`` or ``"mlp"``.
        score: ``"logit"``, ``"probability"`` (softmax over classes) or ``"rank"`` (1 - the
            share of classes scoring strictly higher).

    Returns:
        Maps (B, 1, h, w); differentiable when autograd is on.
    """
    tokens = token_states(model, images)[component][block][:, num_prefix_tokens_of(model) :]
    logits = class_logits(model, tokens)  # (B, N, C)
    rows = torch.arange(len(target))
    picked = logits[rows, :, target]  # (B, N)
    if score == "probability":
        picked = logits.softmax(-1)[rows, :, target]
    if score == "rank":
        picked = 1 - (logits > picked[..., None]).sum(-1).float() / logits.shape[-1]
    return picked.reshape(len(target), 1, *grid)


def class_space_gradient_by_hand(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, paper_exact: bool = False
) -> torch.Tensor:
    """-d CE(head(norm(attention branch at [CLS])), target) / d probs[CLS, image], per block,
    block-local (the probabilities of each block are leaves), summed over heads and blocks.

    Args:
        model: a timm ViT whose head reads token 0.
        images: (B, 3, H, W) with a square patch grid.
        target: (B,) class indices.
        paper_exact: softmax the logits before the cross-entropy (the paper's code).

    Returns:
        Maps (B, 1, h, w).
    """
    x, rope = embed_by_hand(model, images)
    x = x.detach()
    npt = model.num_prefix_tokens
    total = torch.zeros(())
    for block in model.blocks:
        out = block_by_hand(block, x, rope, npt, leaf_probs=True)
        logits = class_logits(model, out.attention[:, 0])
        if paper_exact:
            logits = logits.softmax(-1)
        loss = F.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, out.probs)
        total = total - grad[:, :, 0, npt:].sum(1)
        x = out.output.detach()
    side = int(total.shape[-1] ** 0.5)
    return total.reshape(len(target), 1, side, side).detach()


def rollout_by_hand(
    probs: list[torch.Tensor],
    fusion: str = "mean",
    discard: float = 0.0,
    keep_first: bool = True,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) one example and one block at a time.

    Per block: fuse the heads, zero the ``discard`` share of lowest entries (found by sorting;
    entry (0, 0) is never discarded when ``keep_first``), add the identity, normalise the rows,
    multiply onto the product so far.

    Args:
        probs: attention probabilities (B, heads, N, N), first block first.
        fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard: share of entries to zero.
        keep_first: protect entry (0, 0) ([CLS] -> [CLS]).

    Returns:
        (B, N, N) rolled-out attention.
    """
    batch, n = probs[0].shape[0], probs[0].shape[-1]
    rolled_all = []
    for i in range(batch):
        rolled = torch.eye(n)
        for p in probs:
            heads = p[i]
            fused = {"mean": heads.mean(0), "max": heads.max(0).values, "min": heads.min(0).values}
            flat = fused[fusion].flatten().clone()
            if discard:
                first = 1 if keep_first else 0
                order = sorted(range(first, n * n), key=lambda j, flat=flat: flat[j].item())
                flat[order[: int(discard * (n * n - first))]] = 0.0
            a = flat.reshape(n, n) + torch.eye(n)
            rolled = (a / a.sum(1, keepdim=True)) @ rolled
        rolled_all.append(rolled)
    return torch.stack(rolled_all)


def chefer_by_hand(probs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. (2021) relevance: R <- R + mean_heads(clamp(grad * probs, 0)) R from R = I.

    Args:
        probs: attention probabilities (B, heads, N, N) per block, first block first.
        grads: the target score's gradients with respect to them.

    Returns:
        (B, N, N) relevance.
    """
    n = probs[0].shape[-1]
    relevance = torch.eye(n).repeat(probs[0].shape[0], 1, 1)
    for p, g in zip(probs, grads, strict=True):
        relevance = relevance + (g * p).clamp(min=0).mean(1) @ relevance
    return relevance


def gradcam_by_hand(
    tokens: torch.Tensor, grad: torch.Tensor, num_prefix_tokens: int, relu: bool = True
) -> torch.Tensor:
    """Grad-CAM on tokens: channel weights = gradient mean over the image tokens.

    Args:
        tokens: a layer's output (B, N, D).
        grad: the target score's gradient with respect to it.
        num_prefix_tokens: tokens in front of the image tokens (left out).
        relu: clamp the map at zero.

    Returns:
        (B, N - num_prefix_tokens) scores of the image tokens.
    """
    weights = grad[:, num_prefix_tokens:].mean(1, keepdim=True)
    cam = (weights * tokens[:, num_prefix_tokens:]).sum(-1)
    return (cam.clamp(min=0) if relu else cam).detach()


def captum_gradcam_on_tokens(
    forward: Callable[[torch.Tensor], torch.Tensor],
    layer: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    num_prefix_tokens: int,
    grid: tuple[int, int],
    relu: bool = True,
    channels_last: bool = False,
) -> torch.Tensor:
    """Captum's ``LayerGradCam`` on a probe that sees ``layer``'s image tokens as (B, D, h, w).

    An independent Grad-CAM: the probe reshapes the tokens into a feature map, Captum takes it
    from there.

    Args:
        forward: images -> logits (B, C).
        layer: a module whose output is tokens (B, N, D), or (B, h, w, D) if ``channels_last``.
        images: (B, 3, H, W).
        target: (B,) class indices.
        num_prefix_tokens: tokens in front of the image tokens (kept out of the probe).
        grid: the image tokens' grid (h, w).
        relu: Captum's ``relu_attributions``.
        channels_last: the layer gives (B, h, w, D) (timm Swin).

    Returns:
        Captum's maps (B, 1, h, w).
    """
    probe = nn.Identity()

    def reshape(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if channels_last:
            return probe(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        b, n, d = out.shape
        npt = num_prefix_tokens
        image = probe(out[:, npt:].permute(0, 2, 1).reshape(b, d, *grid))
        return torch.cat([out[:, :npt], image.reshape(b, d, n - npt).permute(0, 2, 1)], 1)

    handle = layer.register_forward_hook(reshape)
    try:
        return LayerGradCam(forward, probe).attribute(images, target, relu_attributions=relu)
    finally:
        handle.remove()


def sobel_by_hand(images: torch.Tensor, patch: int | tuple[int, int]) -> torch.Tensor:
    """Sobel edge magnitude of the channel-mean image (border replicated), mean per patch.

    Args:
        images: (B, C, H, W).
        patch: patch size (ph, pw) or one int.

    Returns:
        (B, 1, H // ph, W // pw).

    Example:
        >>> flat = torch.full((1, 3, 8, 8), 0.5)
        >>> sobel_by_hand(flat, 4).flatten().tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    gray = images.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx[None, None]), F.conv2d(padded, kx.T[None, None])
    return F.avg_pool2d((gx**2 + gy**2).sqrt(), patch)


def frozen_norm_gradient(
    norm: nn.Module, head: nn.Module, state: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """d head(norm(state))[target] / d state with the LayerNorm's scale held constant.

    Autograd through ``(state - mean) / sigma.detach() * weight + bias`` (the norm's scale
    frozen at ``state``), then ``head``.

    Args:
        norm: an ``nn.LayerNorm`` (or ``nn.Identity``).
        head: the linear head.
        state: the read state (B, D).
        target: (B,) class indices.

    Returns:
        (B, D) the gradient, one row per example.
    """
    with torch.enable_grad():
        leaf = state.detach().requires_grad_(True)
        normed = leaf
        if isinstance(norm, nn.LayerNorm):
            sigma = (leaf.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt().detach()
            normed = (leaf - leaf.mean(-1, keepdim=True)) / sigma * norm.weight + norm.bias
        logits = head(normed)
        picked = logits[torch.arange(len(target)), target].sum()
        (grad,) = torch.autograd.grad(picked, leaf)
    return grad


def direct_terms_by_hand(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The direct term of every (block, head, source token) in the target logit, by hand.

    For a timm ViT / DeiT / BEiT / EVA-02 with pre-norm blocks: each read state ([CLS];
    DeiT distilled: [CLS] and the distillation token, each head weighted 1/2; pooled models:
    the mean of the image tokens, normalised by ``fc_norm``) gets the gradient of the target
    logit with its final norm's scale frozen (:func:`frozen_norm_gradient`); the term of
    head ``h`` and token ``j`` in block ``l`` is the read state's attention on ``j`` times
    ``<gradient, layer scale * W_O^h v_j^h>``, summed over read states.

    Args:
        model: the ViT.
        images: (B, 3, H, W).
        target: (B,) class indices.

    Returns:
        (B, blocks, heads, tokens).
    """
    x, rope = embed_by_hand(model, images)
    npt = model.num_prefix_tokens
    probs, vectors = [], []
    for block in model.blocks:
        states = block_by_hand(block, x, rope, npt)
        attn = block.attn
        bias = attn.qkv.bias
        if getattr(attn, "v_bias", None) is not None:  # BEiT / EVA: separate q and v biases
            bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        b, n, d = states.normed.shape
        qkv = F.linear(states.normed, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1)
        values = qkv[:, :, 2]  # (B, N, H, d)
        per_head = attn.proj.weight.reshape(d, attn.num_heads, -1)  # (D, H, d)
        written = torch.einsum("bnhk,ehk->bhne", values, per_head)  # W_O^h v_j: (B, H, N, D)
        vectors.append(_layer_scaled(block, 1, written))
        probs.append(states.probs)
        x = states.output
    if model.global_pool == "avg":
        rows = torch.zeros(x.shape[1])
        rows[npt:] = 1 / (x.shape[1] - npt)
        reads = [(rows, model.fc_norm, model.head, 1.0)]
    else:
        heads = [model.head, *([model.head_dist] if hasattr(model, "head_dist") else [])]
        reads = [
            (F.one_hot(torch.tensor(i), x.shape[1]).float(), model.norm, head, 1 / len(heads))
            for i, head in enumerate(heads)
        ]
    terms = 0
    for rows, norm, head, share in reads:
        grad = share * frozen_norm_gradient(norm, head, rows @ x, target)  # (B, D)
        read_probs = [torch.einsum("i,bhij->bhj", rows, p) for p in probs]  # (B, H, N)
        terms = terms + torch.stack(
            [
                p * (v @ grad[:, None, :, None]).squeeze(-1)
                for p, v in zip(read_probs, vectors, strict=True)
            ],
            1,
        )
    return terms
