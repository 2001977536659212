"""Every forward hook of the package: what is recorded, and the guarantee that it comes off.

:func:`capture` records token states, attention probabilities and module inputs during one
forward pass (:meth:`~class_space_saliency.anatomy.ViTAnatomy.capture` is its public face);
:func:`forward_hook` installs one output-rewriting hook for the length of a ``with`` block
(Grad-CAM's token grid); :func:`intervene` reads or replaces module outputs, module inputs and
attention probabilities (knock-outs, activation patching; :meth:`~class_space_saliency.anatomy.
ViTAnatomy.intervene` is its public face). On exit, also on an exception or a
``KeyboardInterrupt``, every hook is removed and every ``training`` and attention flag that was
switched is restored; contexts nest, each removing exactly what it added.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .adapters import UnsupportedModelError

Reduce = Callable[[str, int, torch.Tensor], torch.Tensor]
"""``f(kind, block, tensor) -> tensor``, applied inside a hook; ``kind`` is the component for
token states, ``"block_input"`` / ``"attention_input"`` for inputs (see :data:`INPUT_SITES`)
and ``"probabilities"`` for attention probabilities."""

INPUT_SITES = ("block", "attention")
"""Modules whose input :func:`capture` can record: a block (its incoming residual stream; block
0's is the embedding) and a block's attention module (the normalised tokens it attends over)."""


class HookTargets(Protocol):
    """What the hooks need to know of a model: :class:`~.anatomy.ViTAnatomy` provides it.

    (A protocol rather than an import: the anatomy uses these hooks, so this module must not
    import it.)
    """

    model: nn.Module
    modules: tuple[nn.Module, ...]
    blocks: list[nn.Module]
    layer_scales: dict[str, list[torch.Tensor | None]] | None
    attention_modules: list[nn.Module] | None
    attention_kind: str
    attention_reason: str | None

    @property
    def depth(self) -> int: ...

    def resolve_layers(self, layer: int | Sequence[int] | str) -> list[int]: ...

    def branch_module(self, component: str, block: int) -> nn.Module: ...


Edit = Callable[[torch.Tensor], "torch.Tensor | None"]
"""``f(tensor) -> replacement``, or ``None`` to leave the tensor as it is (a reader)."""

EDITED_ATTENTION = "class_space_saliency_edited"
"""The name under which :func:`intervene` registers its attention function with transformers'
``AttentionInterface`` while Hugging Face attention is being edited."""

MODULE_SIDES = ("input", "output")
"""Which tensor of a module :func:`capture` records for a ``modules`` site."""


@dataclass
class Capture:
    """What one hooked forward pass recorded.

    Attributes:
        tokens: ``{(component, block): tensor}``; each tensor is (B, N, D) unless a
            ``reduce`` function was given to :func:`capture`, then its output.
        attention: ``{block: (B, heads, N, N)}`` post-softmax attention probabilities.
        inputs: ``{(site, block): (B, N, D)}`` module inputs (see :data:`INPUT_SITES`).
        output: The model's own output (logits) for the batch.

    Every tensor is the ``reduce`` function's output where :func:`capture` was given one.
    """

    tokens: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    inputs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    output: torch.Tensor | None = None


@contextlib.contextmanager
def capture(
    anatomy: HookTargets,
    components: Sequence[tuple[str, int]] = (),
    attention: Sequence[int] = (),
    reduce: Reduce | None = None,
    inputs: Sequence[tuple[str, int]] = (),
    modules: Mapping[tuple[str, int], tuple[nn.Module, str]] | None = None,
) -> Iterator[Capture]:
    """Record token states, attention probabilities and module inputs in the next forward pass.

    Inside the context the model is in eval mode and fused attention is off (timm
    ``fused_attn``, Hugging Face ``config._attn_implementation``) where attention is
    captured; on exit (also on an exception) every hook is removed and every ``training``
    and attention flag is restored.

    Args:
        anatomy: The model's anatomy (which modules to hook).
        components: ``(component, block)`` pairs to record; ``component`` is one of
            :data:`~class_space_saliency.anatomy.COMPONENTS`.
        attention: Blocks whose post-softmax attention probabilities to record.
        reduce: Optional ``f(kind, block, tensor) -> tensor`` (see :data:`Reduce`) applied
            inside the hook so that only its (smaller) result is kept.
        inputs: ``(site, block)`` pairs whose module input to record (see
            :data:`INPUT_SITES`), in ``Capture.inputs``.
        modules: Further sites ``{(name, block): (module, side)}``: the token input
            (``side="input"``) or the output of any submodule, e.g. an MLP's first linear;
            recorded in ``Capture.tokens[(name, block)]``, through ``reduce`` like tokens.

    Yields:
        A :class:`Capture`, filled by the forward pass run inside the context.
    """
    result = Capture()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    switched: list[tuple[Any, str, Any]] = []
    try:
        for component, block in components:
            block = _block_index(anatomy, block)
            scales = (anatomy.layer_scales or {}).get(component)
            scale = None if scales is None else scales[block]
            handles.append(
                anatomy.branch_module(component, block).register_forward_hook(
                    _token_hook(result, component, block, reduce, scale)
                )
            )
        for site, block in inputs:
            block = _block_index(anatomy, block)
            handles.append(
                _input_module(anatomy, site, block).register_forward_pre_hook(
                    _input_hook(result, site, block, reduce), with_kwargs=True
                )
            )
        for (name, block), (module, side) in (modules or {}).items():
            if side not in MODULE_SIDES:
                raise ValueError(f"module side must be one of {MODULE_SIDES}, got {side!r}")
            hook = _token_hook(result, name, block, reduce, None)
            if side == "input":
                handles.append(module.register_forward_pre_hook(_on_input(hook), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook))
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
                    _attention_hooks(
                        anatomy.attention_kind, module, block, result, switched, reduce
                    )
                )
        with eval_mode(anatomy):
            yield result
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, flag in reversed(switched):
            setattr(owner, name, flag)


@contextlib.contextmanager
def eval_mode(anatomy: HookTargets) -> Iterator[None]:
    """The model in eval mode inside the context; the ``training`` flags restored on exit."""
    # Only modules in training mode are switched and restored: setting the flag on every
    # module of a model in eval mode would cost more than a small model's forward pass. The
    # module list is the anatomy's (walked once), not a fresh walk of the model per call.
    training = [module for module in anatomy.modules if module.training]
    try:
        if training:
            anatomy.model.eval()
        yield
    finally:
        for module in training:
            module.training = True


@contextlib.contextmanager
def intervene(
    anatomy: HookTargets,
    outputs: Mapping[nn.Module, Edit] | None = None,
    inputs: Mapping[nn.Module, Edit] | None = None,
    attention: Mapping[int, Edit] | None = None,
) -> Iterator[None]:
    """Read or replace module outputs, module inputs and attention probabilities.

    Each edit ``f(tensor)`` returns the replacement or ``None`` (keep it; a reader). Edits of
    nested contexts run in the order the contexts were entered, each seeing the previous one's
    result (as forward hooks do). The training mode is left as it is.

    Attention probabilities (B, heads, N, N) are edited after the softmax and attention
    dropout, before they weigh the values: timm reads them at ``attn_drop`` (``fused_attn`` off
    inside the context); Hugging Face models run an attention function registered with
    transformers' ``AttentionInterface`` (``config._attn_implementation`` switched inside the
    context), which calls the model's own ``eager_attention_forward``, edits the probabilities
    it returns and recomputes ``probabilities @ values`` (modules that are not edited get the
    eager result unchanged). The registration is removed when the last such context exits.

    Args:
        anatomy: The model's anatomy (its attention modules and how to edit them).
        outputs: ``{module: edit}`` of the module's output (the first element of a tuple).
        inputs: ``{module: edit}`` of the module's first positional input.
        attention: ``{block: edit}`` of the block's post-softmax attention probabilities.

    Raises:
        UnsupportedModelError: Where the attention probabilities cannot be edited
            (``nn.MultiheadAttention``, unknown attention modules, Hugging Face models whose
            attention does not dispatch through ``AttentionInterface``).
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    switched: list[tuple[Any, str, Any]] = []
    registered: list[tuple[nn.Module, Edit]] = []
    try:
        for module, edit in (outputs or {}).items():
            handles.append(module.register_forward_hook(_output_editor(edit)))
        for module, edit in (inputs or {}).items():
            handles.append(module.register_forward_pre_hook(_input_editor(edit)))
        for block, edit in (attention or {}).items():
            module = _editable_attention(anatomy, block)
            if anatomy.attention_kind == "hf":
                _edit_hf_attention(module, edit, switched, registered)
                handles.append(module.register_forward_pre_hook(_forget_dispatch))
                handles.append(module.register_forward_hook(_check_dispatched))
            else:  # timm: probabilities pass through attn_drop when fused attention is off
                if hasattr(module, "fused_attn"):
                    switched.append((module, "fused_attn", module.fused_attn))
                    module.fused_attn = False
                handles.append(module.attn_drop.register_forward_hook(_output_editor(edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, edit in registered:
            _release_hf_edit(module, edit)
        for owner, name, flag in reversed(switched):
            setattr(owner, name, flag)


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


def _block_index(anatomy: HookTargets, block: int) -> int:
    """``block`` as an index from 0 (negative indices count from the last block)."""
    if type(block) is not int or not 0 <= block < anatomy.depth:
        return anatomy.resolve_layers(block)[0]
    return block


def _input_module(anatomy: HookTargets, site: str, block: int) -> nn.Module:
    """The module whose input ``(site, block)`` names."""
    if site not in INPUT_SITES:
        raise ValueError(f"input site must be one of {INPUT_SITES}, got {site!r}")
    if site == "block":
        return anatomy.blocks[block]
    if anatomy.attention_modules is None or anatomy.attention_modules[block] is None:
        raise ValueError(
            f"the attention input of {type(anatomy.model).__name__} cannot be captured: "
            f"{anatomy.attention_reason or 'no supported attention modules found'}"
        )
    return anatomy.attention_modules[block]


INPUT_KEYWORDS = ("hidden_states", "x", "query", "q_x", "input")
"""Keyword names under which blocks and attention modules take their token input."""


def _token_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The token tensor a module is called with: its first argument or a known keyword."""
    named = (kwargs[k] for k in INPUT_KEYWORDS if k in kwargs)
    tokens = args[0] if args else next(named, None)
    if not isinstance(tokens, torch.Tensor):
        raise UnsupportedModelError(
            f"{type(module).__name__} takes no token tensor as its first argument or as "
            f"one of {INPUT_KEYWORDS}"
        )
    return tokens


def _input_hook(result: Capture, site: str, block: int, reduce: Reduce | None) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = _token_input(module, args, kwargs)
        kind = f"{site}_input"
        result.inputs[(site, block)] = tokens if reduce is None else reduce(kind, block, tokens)

    return hook


def _on_input(hook: Callable) -> Callable:
    """A forward pre-hook that hands a module's token input to the output ``hook`` of
    :func:`_token_hook`."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hook(module, (), _token_input(module, args, kwargs))

    return pre_hook


def _attention_hooks(
    kind: str,
    module: nn.Module,
    block: int,
    result: Capture,
    switched: list,
    reduce: Reduce | None = None,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that record (B, heads, N, N) probabilities of one attention module.

    ``switched`` collects ``(owner, attribute, old value)`` of the flags changed here
    (timm ``fused_attn``, Hugging Face ``config._attn_implementation``), restored in
    reverse order by :func:`capture`.
    """

    def store(tensor: torch.Tensor) -> None:
        result.attention[block] = (
            tensor if reduce is None else reduce("probabilities", block, tensor)
        )

    if kind == "mha":  # torchvision: ask MHA for per-head weights

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        return [
            module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            module.register_forward_hook(lambda mod, args, output: store(output[1])),
        ]
    if kind == "hf":  # eager attention returns (output, probabilities)
        config = module.config
        if config._attn_implementation != EDITED_ATTENTION:  # edited attention returns them too
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


def _output_editor(edit: Edit) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        tensor = output[0] if isinstance(output, tuple) else output
        replaced = edit(tensor)
        if replaced is None:
            return None
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    return hook


def _input_editor(edit: Edit) -> Callable:
    def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
        replaced = edit(args[0])
        return None if replaced is None else (replaced, *args[1:])

    return pre_hook


def _editable_attention(anatomy: HookTargets, block: int) -> nn.Module:
    """The attention module of ``block``, if its probabilities can be edited."""
    name = type(anatomy.model).__name__
    if anatomy.attention_modules is None:
        raise UnsupportedModelError(
            f"attention probabilities of {name} cannot be edited: "
            f"{anatomy.attention_reason or 'no supported attention modules found'}"
        )
    if anatomy.attention_kind == "mha":
        raise UnsupportedModelError(
            f"attention probabilities of {name} cannot be edited: nn.MultiheadAttention "
            "computes them and their weighted sum in one call, with no hook in between"
        )
    module = anatomy.attention_modules[block]
    if anatomy.attention_kind == "timm" and not hasattr(module, "attn_drop"):
        raise UnsupportedModelError(
            f"attention probabilities of {name} cannot be edited: block {block}'s attention "
            f"({type(module).__name__}) has no attn_drop to read them at"
        )
    return module


# Hugging Face: {attention module: edits in the order they were entered}, read by
# _edited_attention while config._attn_implementation names it; _HF_CALLED holds the modules
# it ran for in the current forward pass, so that an edit that was never applied raises.
_HF_EDITS: dict[nn.Module, list[Edit]] = {}
_HF_CALLED: set[nn.Module] = set()


def _forget_dispatch(module: nn.Module, args: tuple) -> None:
    _HF_CALLED.discard(module)


def _check_dispatched(module: nn.Module, args: tuple, output: Any) -> None:
    if module not in _HF_CALLED:
        raise UnsupportedModelError(
            f"attention probabilities of {type(module).__name__} cannot be edited: it did not "
            "call its attention function through transformers' AttentionInterface with itself "
            "as the module (transformers 5 attention modules do)"
        )


def _edit_hf_attention(
    module: nn.Module,
    edit: Edit,
    switched: list[tuple[Any, str, Any]],
    registered: list[tuple[nn.Module, Edit]],
) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not hasattr(sys.modules[type(module).__module__], "eager_attention_forward"):
        raise UnsupportedModelError(
            f"attention probabilities of {type(module).__name__} cannot be edited: its module "
            "has no eager_attention_forward to dispatch through transformers' AttentionInterface "
            "(transformers >= 4.48 models do)"
        )
    if EDITED_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS[EDITED_ATTENTION] = _edited_attention
    _HF_EDITS.setdefault(module, []).append(edit)
    registered.append((module, edit))
    config = module.config
    if config._attn_implementation != EDITED_ATTENTION:
        switched.append((config, "_attn_implementation", config._attn_implementation))
        config._attn_implementation = EDITED_ATTENTION


def _release_hf_edit(module: nn.Module, edit: Edit) -> None:
    """Remove one edit; unregister the attention function once no edit is left."""
    edits = _HF_EDITS[module]
    del edits[next(i for i, e in enumerate(edits) if e is edit)]
    if not edits:
        del _HF_EDITS[module]
        _HF_CALLED.discard(module)
    if not _HF_EDITS:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        del ALL_ATTENTION_FUNCTIONS[EDITED_ATTENTION]


def _edited_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's eager attention with the probabilities of edited modules replaced."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    output, probabilities = eager(module, query, key, value, attention_mask, **kwargs)
    edits = _HF_EDITS.get(module, ())
    if edits:
        _HF_CALLED.add(module)
    edited = False
    for edit in edits:
        replaced = edit(probabilities)
        if replaced is not None:
            probabilities, edited = replaced, True
    if edited:  # eager's own output layout: (B, N, heads, head_dim)
        output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, probabilities
