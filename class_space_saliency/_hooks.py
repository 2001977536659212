"""Every forward hook of the package: what is recorded, and the guarantee that it comes off.

:func:`capture` records token states and attention probabilities during one forward pass
(:meth:`~class_space_saliency.anatomy.ViTAnatomy.capture` is its public face);
:func:`forward_hook` installs one output-rewriting hook for the length of a ``with`` block
(Grad-CAM's token grid). On exit, also on an exception or a ``KeyboardInterrupt``, every hook
is removed and every ``training`` and attention flag that was switched is restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import UnsupportedModelError

if TYPE_CHECKING:
    from .anatomy import ViTAnatomy

Reduce = Callable[[str, int, torch.Tensor], torch.Tensor]
"""``f(component, block, tokens) -> tensor``, applied inside a token hook."""

BLOCK_INPUT = "block_input"
"""Capture site of the residual stream entering a block (for block 0: the embedded tokens),
recorded by a forward pre-hook on the block."""


@dataclass
class Capture:
    """What one hooked forward pass recorded.

    Attributes:
        tokens: ``{(component, block): tensor}``; each tensor is (B, N, D) unless a
            ``reduce`` function was given to :func:`capture`, then its output.
        attention: ``{block: (B, heads, N, N)}`` post-softmax attention probabilities.
        output: The model's own output (logits) for the batch.
    """

    tokens: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    output: torch.Tensor | None = None


@contextlib.contextmanager
def capture(
    anatomy: ViTAnatomy,
    components: Sequence[tuple[str, int]] = (),
    attention: Sequence[int] = (),
    reduce: Reduce | None = None,
) -> Iterator[Capture]:
    """Record token states and attention probabilities during the next forward pass.

    Inside the context the model is in eval mode and fused attention is off (timm
    ``fused_attn``, Hugging Face ``config._attn_implementation``) where attention is
    captured; on exit (also on an exception) every hook is removed and every ``training``
    and attention flag is restored.

    Args:
        anatomy: The model's anatomy (which modules to hook).
        components: ``(component, block)`` pairs to record; ``component`` is one of
            :data:`~class_space_saliency.anatomy.COMPONENTS` or :data:`BLOCK_INPUT`.
        attention: Blocks whose post-softmax attention probabilities to record.
        reduce: Optional ``f(component, block, tokens) -> tensor`` applied inside the
            hook so that only its (smaller) result is kept.

    Yields:
        A :class:`Capture`, filled by the forward pass run inside the context.
    """
    result = Capture()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    # Only modules in training mode are switched and restored: setting the flag on every
    # module of a model in eval mode would cost more than a small model's forward pass. The
    # module list is the anatomy's (walked once), not a fresh walk of the model per call.
    training = [module for module in anatomy.modules if module.training]
    switched: list[tuple[Any, str, Any]] = []
    try:
        for component, block in components:
            if type(block) is not int or not 0 <= block < anatomy.depth:
                block = anatomy.resolve_layers(block)[0]
            if component == BLOCK_INPUT:
                handles.append(
                    anatomy.blocks[block].register_forward_pre_hook(
                        _input_hook(result, block, reduce), with_kwargs=True
                    )
                )
                continue
            scales = (anatomy.layer_scales or {}).get(component)
            scale = None if scales is None else scales[block]
            handles.append(
                anatomy.branch_module(component, block).register_forward_hook(
                    _token_hook(result, component, block, reduce, scale)
                )
            )
        if attention:
            if anatomy.attention_modules is None:
                raise ValueError(
                    f"attention probabilities cannot be captured for "
                    f"{type(anatomy.model).__name__}: "
                    f"{anatomy.attention_reason or 'no supported attention modules found'}"
                )
            for block in anatomy.resolve_layers(list(attention)):
                module = anatomy.attention_modules[block]
                handles.extend(
                    _attention_hooks(anatomy.attention_kind, module, block, result, switched)
                )
        if training:
            anatomy.model.eval()
        yield result
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, flag in reversed(switched):
            setattr(owner, name, flag)
        for module in training:
            module.training = True


@contextlib.contextmanager
def forward_hook(
    module: nn.Module, hook: Callable[[nn.Module, tuple, Any], Any]
) -> Iterator[torch.utils.hooks.RemovableHandle]:
    """``module.register_forward_hook(hook)`` for the length of a ``with`` block.

    Args:
        module: The module to hook.
        hook: ``hook(module, args, output)``; a non-``None`` return replaces the output.

    Yields:
        The hook's handle (removed on exit, also on an exception).
    """
    handle = module.register_forward_hook(hook)
    try:
        yield handle
    finally:
        handle.remove()


def _store(
    result: Capture,
    component: str,
    block: int,
    tokens: torch.Tensor,
    reduce: Reduce | None,
    scale: torch.Tensor | None = None,
) -> None:
    """Record token states as (B, N, D) (after layer scale), or their ``reduce``-d form."""
    if tokens.dim() == 4:  # channels-last grids (timm Swin) -> (B, h*w, C)
        tokens = tokens.flatten(1, 2)
    if scale is not None:
        tokens = tokens * scale
    result.tokens[(component, block)] = (
        tokens if reduce is None else reduce(component, block, tokens)
    )


def _token_hook(
    result: Capture,
    component: str,
    block: int,
    reduce: Reduce | None,
    scale: torch.Tensor | None,
) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        tokens = output[0] if isinstance(output, tuple) else output
        _store(result, component, block, tokens, reduce, scale)

    return hook


def _input_hook(result: Capture, block: int, reduce: Reduce | None) -> Callable:
    """Pre-hook recording a block's input: its first positional argument, else the first
    tensor passed by keyword (``hidden_states=`` in Hugging Face encoders)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        _store(result, BLOCK_INPUT, block, tokens, reduce)

    return hook


def _attention_hooks(
    kind: str, module: nn.Module, block: int, result: Capture, switched: list
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that record (B, heads, N, N) probabilities of one attention module.

    ``switched`` collects ``(owner, attribute, old value)`` of the flags changed here
    (timm ``fused_attn``, Hugging Face ``config._attn_implementation``), restored in
    reverse order by :func:`capture`.
    """

    def store(tensor: torch.Tensor) -> None:
        result.attention[block] = tensor

    if kind == "mha":  # torchvision: ask MHA for per-head weights

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        return [
            module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            module.register_forward_hook(lambda mod, args, output: store(output[1])),
        ]
    if kind == "hf":  # eager attention returns (output, probabilities)
        config = module.config
        switched.append((config, "_attn_implementation", config._attn_implementation))
        config._attn_implementation = "eager"

        def post_hook(mod: nn.Module, args: tuple, output: tuple) -> None:
            if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                raise UnsupportedModelError(
                    f"{type(mod).__name__} returned no attention probabilities even with "
                    "eager attention"
                )
            store(output[1])

        return [module.register_forward_hook(post_hook)]
    # timm Attention: post-softmax probabilities pass through attn_drop (identity in eval)
    if hasattr(module, "fused_attn"):
        switched.append((module, "fused_attn", module.fused_attn))
        module.fused_attn = False
    return [module.attn_drop.register_forward_hook(lambda mod, args, output: store(output))]
