"""ViT anatomy: where a model keeps its blocks, final norm, head(s) and prefix tokens.

:class:`ViTAnatomy` finds these parts on timm ``VisionTransformer`` models (plain, DeiT
distilled, register tokens, average-pooled with ``fc_norm``, ``dynamic_img_size``) and on
torchvision's ``VisionTransformer``; custom models name them explicitly.
:meth:`ViTAnatomy.capture` records token states and attention probabilities in one forward
pass with hooks that always come off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

COMPONENTS = ("residual", "attention", "mlp")
"""Token states that can be captured per block: block output, attention branch, MLP branch."""


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


class _NormThenHeads(nn.Module):
    """``mean_k head_k(norm(x))``: the class-space projection of any token state."""

    def __init__(self, norm: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.norm = norm
        self.heads = nn.ModuleList(heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        normed = self.norm(tokens)
        logits = self.heads[0](normed)
        for head in self.heads[1:]:
            logits = logits + head(normed)
        return logits / len(self.heads) if len(self.heads) > 1 else logits


@dataclass
class Capture:
    """What one hooked forward pass recorded.

    Attributes:
        tokens: ``{(component, block): tensor}``; each tensor is (B, N, D) unless a
            ``reduce`` function was given to :meth:`ViTAnatomy.capture`, then its output.
        attention: ``{block: (B, heads, N, N)}`` post-softmax attention probabilities.
        output: The model's own output (logits) for the batch.
    """

    tokens: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    output: torch.Tensor | None = None


@dataclass
class ViTAnatomy:
    """The parts of a Vision Transformer that class-space analysis needs.

    Build it with :meth:`from_model`; the fields are public so that custom models can be
    described by hand.

    Attributes:
        model: The classifier.
        blocks: Transformer blocks in order.
        norm: Module mapping token states (..., D) to the normalised tokens the head reads
            (the final ``norm``, then ``fc_norm`` where the model has one).
        heads: Classifier head(s); several are averaged (DeiT distilled).
        num_prefix_tokens: [CLS], distillation and register tokens before the image tokens.
        patch_size: (ph, pw) in pixels.
        img_size: The fixed input size (H, W), or ``None`` for dynamic-size models.
        dynamic_pad: Whether a dynamic-size model pads inputs up to a multiple of the patch.
        in_chans: Input channels the model expects, where known.
        attention_branches: Per block, the module whose output is the attention branch
            before the residual add (after layer scale); ``None`` where unknown.
        mlp_branches: Per block, the module whose output is the MLP branch before the add.
        attention_modules: Per block, the attention module whose probabilities
            :meth:`capture` records; ``None`` where unsupported.
    """

    model: nn.Module
    blocks: list[nn.Module]
    norm: nn.Module
    heads: tuple[nn.Module, ...]
    num_prefix_tokens: int
    patch_size: tuple[int, int]
    img_size: tuple[int, int] | None = None
    dynamic_pad: bool = False
    in_chans: int | None = None
    attention_branches: list[nn.Module] | None = None
    mlp_branches: list[nn.Module] | None = None
    attention_modules: list[nn.Module] | None = None
    projection: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.projection = _NormThenHeads(self.norm, self.heads)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        blocks: Sequence[nn.Module] | None = None,
        norm: nn.Module | None = None,
        head: nn.Module | Sequence[nn.Module] | None = None,
        num_prefix_tokens: int | None = None,
        patch_size: int | Sequence[int] | None = None,
        img_size: int | Sequence[int] | None = None,
    ) -> ViTAnatomy:
        """Find the anatomy of ``model``; keyword arguments override what is found.

        Args:
            model: A timm or torchvision ``VisionTransformer``, or any ViT-like model
                whose parts are given with the overrides.
            blocks: The transformer blocks, in order.
            norm: The module applied to tokens before the head.
            head: The classifier head, or several heads to average.
            num_prefix_tokens: Tokens before the image tokens.
            patch_size: Patch size in pixels (int or (ph, pw)).
            img_size: Fixed input size; ``None`` accepts any multiple of the patch size.

        Returns:
            The anatomy.

        Raises:
            TypeError: If the model is not a supported ViT and the overrides do not
                describe it.

        Example:
            >>> import timm
            >>> model = timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=2)
            >>> anatomy = ViTAnatomy.from_model(model)
            >>> len(anatomy.blocks), anatomy.num_prefix_tokens, anatomy.grid_size((224, 224))
            (2, 1, (14, 14))
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        found = _find_timm(model) or _find_torchvision(model) or {}
        overrides = dict(
            blocks=list(blocks) if blocks is not None else None,
            norm=norm,
            heads=None if head is None else _as_heads(head),
            num_prefix_tokens=num_prefix_tokens,
            patch_size=None if patch_size is None else _pair(patch_size),
            img_size=None if img_size is None else _pair(img_size),
        )
        parts = {**found, **{k: v for k, v in overrides.items() if v is not None}}
        missing = [k for k in ("blocks", "norm", "heads", "num_prefix_tokens", "patch_size")]
        missing = [k for k in missing if parts.get(k) is None]
        if missing:
            raise TypeError(
                f"cannot find the ViT anatomy of {type(model).__name__}: looked for a timm "
                "VisionTransformer (blocks, norm/fc_norm, head, num_prefix_tokens, "
                "patch_embed) or a torchvision VisionTransformer (encoder.layers, encoder.ln, "
                f"heads); missing {missing}. Pass them explicitly, e.g. "
                "ClassSpaceSaliency(model, blocks=..., norm=..., head=..., "
                "num_prefix_tokens=..., patch_size=...)"
            )
        if blocks is not None:  # custom blocks: find branches by timm naming where possible
            parts.update(_timm_block_parts(parts["blocks"]))
        if len(parts["blocks"]) == 0:
            raise TypeError(f"{type(model).__name__} has no transformer blocks")
        return cls(model=model, **parts)

    # ------------------------------------------------------------------ geometry
    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def grid_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        """Patch grid (h, w) for an input of spatial size (H, W).

        Raises:
            ValueError: If the model has a fixed input size and ``input_size`` differs, or
                the size is smaller than one patch.
        """
        height, width = int(input_size[-2]), int(input_size[-1])
        ph, pw = self.patch_size
        if self.img_size is not None and (height, width) != self.img_size:
            raise ValueError(
                f"inputs must have spatial size {self.img_size} for this fixed-size model "
                f"(patch {self.patch_size}), got {(height, width)}; resize the images or build "
                "a timm model with dynamic_img_size=True"
            )
        if height < ph or width < pw:
            raise ValueError(f"inputs of size {(height, width)} are smaller than one patch")
        if self.dynamic_pad:
            return (math.ceil(height / ph), math.ceil(width / pw))
        return (height // ph, width // pw)

    def resolve_layers(self, layer: int | Sequence[int] | str) -> list[int]:
        """Normalise a layer spec (int, list of ints, or ``"all"``) to block indices.

        Negative indices count from the last block.

        Raises:
            ValueError: For an index outside the model or an empty list.
            TypeError: For anything that is not an int, a sequence of ints or ``"all"``.
        """
        if isinstance(layer, str):
            if layer != "all":
                raise ValueError(f"layer must be an int, a list of ints or 'all', got {layer!r}")
            return list(range(self.depth))
        specs = [layer] if isinstance(layer, int) else layer
        if isinstance(specs, torch.Tensor):
            specs = specs.tolist()
        if not isinstance(specs, Sequence) or len(specs) == 0:
            raise TypeError(f"layer must be an int, a list of ints or 'all', got {layer!r}")
        resolved = []
        for spec in specs:
            if isinstance(spec, bool) or not isinstance(spec, int):
                raise TypeError(f"layer indices must be ints, got {spec!r} in {layer!r}")
            if not -self.depth <= spec < self.depth:
                raise ValueError(
                    f"layer {spec} is out of range for a model with {self.depth} blocks "
                    f"(valid: {-self.depth} .. {self.depth - 1})"
                )
            resolved.append(spec % self.depth)
        return resolved

    # ------------------------------------------------------------------ projection
    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits ``mean_k head_k(norm(tokens))`` for token states (..., D) -> (..., C)."""
        return self.projection(tokens)

    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The head as one affine map ``(weight (C, D), bias (C,))``, or ``None``.

        Averaged heads of distilled models are averaged here too. ``None`` when a head is
        not a single ``nn.Linear`` (then target scores go through :meth:`project`).
        """
        if not all(isinstance(head, nn.Linear) for head in self.heads):
            return None
        biases = [
            head.bias if head.bias is not None else torch.zeros_like(head.weight[:, 0])
            for head in self.heads
        ]
        if len(self.heads) == 1:  # no copy: this runs once per block on every call
            return self.heads[0].weight, biases[0]
        weight = torch.stack([head.weight for head in self.heads]).mean(0)
        return weight, torch.stack(biases).mean(0)

    @property
    def num_classes(self) -> int:
        """Number of classes of the head."""
        linear = self.linear_head()
        if linear is not None:
            return linear[0].shape[0]
        with torch.no_grad():
            width = next(p for p in self.norm.parameters()).shape[-1]
            probe = next(self.model.parameters()).new_zeros(1, width)
            return self.project(probe).shape[-1]

    # ------------------------------------------------------------------ hooks
    def branch_module(self, component: str, block: int) -> nn.Module:
        """The module whose output is ``component`` of ``block``.

        Raises:
            ValueError: For an unknown component, or one this model does not expose.
        """
        if component == "residual":
            return self.blocks[block]
        table = {"attention": self.attention_branches, "mlp": self.mlp_branches}
        if component not in table:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        modules = table[component]
        if modules is None or modules[block] is None:
            raise ValueError(
                f"component {component!r} is not available for {type(self.model).__name__}: "
                "its blocks have no recognised attention/MLP branch modules"
            )
        return modules[block]

    @contextlib.contextmanager
    def capture(
        self,
        components: Sequence[tuple[str, int]] = (),
        attention: Sequence[int] = (),
        reduce: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None,
    ) -> Iterator[Capture]:
        """Record token states and attention probabilities during the next forward pass.

        Inside the context the model is in eval mode and timm's fused attention is off
        (where attention is captured); on exit (also on an exception) every hook is
        removed and every ``training`` and ``fused_attn`` flag is restored.

        Args:
            components: ``(component, block)`` pairs to record.
            attention: Blocks whose post-softmax attention probabilities to record.
            reduce: Optional ``f(component, block, tokens) -> tensor`` applied inside the
                hook so that only its (smaller) result is kept.

        Yields:
            A :class:`Capture`, filled by the forward pass run inside the context.

        Example:
            >>> with anatomy.capture([("residual", -1)]) as cap:
            ...     cap.output = model(images)
            >>> cap.tokens[("residual", anatomy.depth - 1)].shape  # (B, N, D)
        """
        result = Capture()
        handles: list[torch.utils.hooks.RemovableHandle] = []
        # Only modules in training mode are switched and restored: setting the flag on every
        # module of a model in eval mode would cost more than a small model's forward pass.
        training = [module for module in self.model.modules() if module.training]
        fused = {}
        try:
            for component, block in components:
                block = self.resolve_layers(block)[0]
                handles.append(
                    self.branch_module(component, block).register_forward_hook(
                        _token_hook(result, component, block, reduce)
                    )
                )
            if attention:
                if self.attention_modules is None:
                    raise ValueError(
                        f"attention probabilities cannot be captured for "
                        f"{type(self.model).__name__}: no supported attention modules found"
                    )
                for block in self.resolve_layers(list(attention)):
                    module = self.attention_modules[block]
                    handles.extend(_attention_hooks(module, block, result, fused))
            if training:
                self.model.eval()
            yield result
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in fused.items():
                module.fused_attn = flag
            for module in training:
                module.training = True


# ---------------------------------------------------------------------------- hook helpers
def _token_hook(
    result: Capture,
    component: str,
    block: int,
    reduce: Callable[[str, int, torch.Tensor], torch.Tensor] | None,
) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        tokens = output[0] if isinstance(output, tuple) else output
        result.tokens[(component, block)] = (
            tokens if reduce is None else reduce(component, block, tokens)
        )

    return hook


def _attention_hooks(
    module: nn.Module, block: int, result: Capture, fused: dict[nn.Module, bool]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that record (B, heads, N, N) probabilities of one attention module."""

    def store(tensor: torch.Tensor) -> None:
        result.attention[block] = tensor

    if isinstance(module, nn.MultiheadAttention):  # torchvision: ask MHA for per-head weights

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def post_hook(mod: nn.Module, args: tuple, output: tuple) -> None:
            store(output[1])

        return [
            module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            module.register_forward_hook(post_hook),
        ]
    # timm Attention: post-softmax probabilities pass through attn_drop (identity in eval)
    if hasattr(module, "fused_attn"):
        fused[module] = module.fused_attn
        module.fused_attn = False
    return [module.attn_drop.register_forward_hook(lambda mod, args, output: store(output))]


# ---------------------------------------------------------------------------- model families
def _as_heads(head: nn.Module | Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    return (head,) if isinstance(head, nn.Module) else tuple(head)


def _timm_block_parts(blocks: Sequence[nn.Module]) -> dict:
    """Attention/MLP branch and attention modules of timm-style blocks (None where absent)."""

    def branch(block: nn.Module, scale: str, core: str) -> nn.Module | None:
        if hasattr(block, scale):
            return getattr(block, scale)
        return getattr(block, core, None)

    attention_modules = [getattr(b, "attn", None) for b in blocks]
    usable = all(m is not None and hasattr(m, "attn_drop") for m in attention_modules)
    return dict(
        attention_branches=[branch(b, "ls1", "attn") for b in blocks],
        mlp_branches=[branch(b, "ls2", "mlp") for b in blocks],
        attention_modules=attention_modules if usable else None,
    )


def _find_timm(model: nn.Module) -> dict | None:
    needed = ("blocks", "norm", "head", "patch_embed", "num_prefix_tokens")
    if not all(hasattr(model, name) for name in needed):
        return None
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError(
            f"{type(model).__name__} pools tokens with an attention head (global_pool='map'); "
            "class-space projection needs a linear head on token states"
        )
    heads = [model.head]
    if hasattr(model, "head_dist"):
        heads.append(model.head_dist)
    if any(isinstance(h, nn.Identity) for h in heads):
        raise TypeError(f"{type(model).__name__} has no classifier head (num_classes=0)")
    patch_embed = model.patch_embed
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    fc_norm = getattr(model, "fc_norm", nn.Identity())
    blocks = list(model.blocks)
    return dict(
        blocks=blocks,
        norm=nn.Sequential(model.norm, fc_norm),
        heads=tuple(heads),
        num_prefix_tokens=int(model.num_prefix_tokens),
        patch_size=_pair(patch_embed.patch_size),
        img_size=None if dynamic else _pair(patch_embed.img_size),
        dynamic_pad=bool(getattr(patch_embed, "dynamic_img_pad", False)),
        in_chans=getattr(getattr(patch_embed, "proj", None), "in_channels", None),
        **_timm_block_parts(blocks),
    )


def _find_torchvision(model: nn.Module) -> dict | None:
    encoder = getattr(model, "encoder", None)
    if encoder is None or not all(hasattr(encoder, n) for n in ("layers", "ln")):
        return None
    if not hasattr(model, "heads") or not hasattr(model, "patch_size"):
        return None
    blocks = list(encoder.layers)
    return dict(
        blocks=blocks,
        norm=encoder.ln,
        heads=(model.heads,),
        num_prefix_tokens=1,
        patch_size=_pair(model.patch_size),
        img_size=_pair(model.image_size),
        in_chans=model.conv_proj.in_channels,
        attention_branches=[b.self_attention for b in blocks],
        mlp_branches=[b.mlp for b in blocks],
        attention_modules=[b.self_attention for b in blocks],
    )
