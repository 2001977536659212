"""ViT anatomy: where a model keeps its blocks, final norm, head(s) and prefix tokens.

:class:`ViTAnatomy` holds the parts that a family adapter (:mod:`.adapters`) finds: timm
``VisionTransformer`` (plain, DeiT distilled, register tokens, pooled heads, dynamic size),
timm BEiT / EVA, torchvision's ``VisionTransformer``, ...; custom models name them
explicitly. :meth:`ViTAnatomy.capture` records token states and attention probabilities in
one forward pass; its hooks live in :mod:`._hooks` (every hook of the package does) and always
come off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _hooks
from ._hooks import Capture, Edit
from .adapters import (
    NormThenHeads,
    Readout,
    TokenPath,
    UnsupportedModelError,
    find_adapter,
    looked_for,
)
from .adapters.base import pair, timm_block_parts

COMPONENTS = ("residual", "attention", "mlp")
"""Token states that can be captured per block: block output, attention branch, MLP branch."""

ATTENTION_KINDS = ("timm", "mha", "hf")
"""How attention probabilities are read: timm ``attn_drop`` input (fused attention off),
``nn.MultiheadAttention`` per-head weights, Hugging Face eager attention's second output."""


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
        num_prefix_tokens: [CLS], distillation and register tokens before the image tokens
            (in the blocks from ``prefix_from_block`` on).
        patch_size: (ph, pw) in pixels.
        img_size: The fixed input size (H, W), or ``None`` for dynamic-size models.
        dynamic_pad: Whether a dynamic-size model pads inputs up to a multiple of the patch.
        in_chans: Input channels the model expects, where known.
        attention_branches: Per block, the module whose output is the attention branch
            before the residual add (after layer scale); ``None`` where unknown.
        mlp_branches: Per block, the module whose output is the MLP branch before the add.
        attention_modules: Per block, the attention module whose probabilities
            :meth:`capture` records; ``None`` where unsupported.
        readout: The token rows the head reads (default: token 0 for models with prefix
            tokens, else the mean of all tokens).
        layer_scales: ``{"attention": [...], "mlp": [...]}`` per-block tensors that multiply
            the branch module's output (BEiT/EVA ``gamma_1``/``gamma_2``); ``None`` entries
            where the branch module applies its own scale.
        attention_kind: How :meth:`capture` reads attention probabilities (see
            :data:`ATTENTION_KINDS`).
        attention_reason: Why attention cannot be read, where ``attention_modules`` is None.
        pre_attention_norms: Per block, the norm before attention (``None`` for post-norm
            blocks, which normalise after attention).
        attention_inputs: Per block, the module whose output is the tokens its attention
            reads (Grad-CAM's layer): the norm before attention of pre-norm blocks; the
            previous block (or the stem) of post-norm blocks. Defaults to
            ``pre_attention_norms``.
        prefix_from_block: The first block whose tokens include the prefix tokens; earlier
            blocks hold image tokens only (ConViT joins [CLS] before block
            ``local_up_to_layer``; CaiT and XCiT only in their class-attention blocks, after
            every block listed here: then it equals the depth).
        token_path: How tokens are embedded and classified (token removal), or why not.
        output_logits: Maps the model's output to logits (B, C), e.g. Hugging Face outputs.
        family: The adapter that found the parts (``"custom"`` for hand-made anatomies).
        overrides: The parts given by hand to :meth:`from_model` (their errors are the
            user's to fix).
        channels_last: Blocks output channels-last grids (B, h, w, D) instead of token
            sequences (B, N, D) (timm Swin); captured states are flattened to (B, h*w, D).
        modules: Every module of ``model``, listed once when the anatomy is built (the
            training flags :meth:`capture` switches and restores).
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
    readout: Readout | None = None
    layer_scales: dict[str, list[torch.Tensor | None]] | None = None
    attention_kind: str = "timm"
    attention_reason: str | None = None
    pre_attention_norms: list[nn.Module | None] | None = None
    attention_inputs: list[nn.Module | None] | None = None
    prefix_from_block: int = 0
    token_path: TokenPath | str | None = None
    output_logits: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False)
    family: str = "custom"
    overrides: tuple[str, ...] = ()
    channels_last: bool = False
    projection: nn.Module = field(init=False, repr=False)
    modules: tuple[nn.Module, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.projection = NormThenHeads(self.norm, self.heads)
        # Walked once: capture() restores the training flags of these on every call.
        self.modules = tuple(self.model.modules())
        if self.readout is None:
            prefix = self.num_prefix_tokens
            self.readout = Readout(cls_rows=(0,)) if prefix else Readout(pool_start=0)
        if self.attention_inputs is None:
            self.attention_inputs = self.pre_attention_norms
        if self.attention_kind not in ATTENTION_KINDS:
            raise ValueError(
                f"attention_kind must be one of {ATTENTION_KINDS}, got {self.attention_kind!r}"
            )

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
            model: A model of a supported family (see :mod:`.adapters`), or any ViT-like
                model whose parts are given with the overrides.
            blocks: The transformer blocks, in order.
            norm: The module applied to tokens before the head.
            head: The classifier head, or several heads to average.
            num_prefix_tokens: Tokens before the image tokens.
            patch_size: Patch size in pixels (int or (ph, pw)).
            img_size: Fixed input size; ``None`` accepts any multiple of the patch size.

        Returns:
            The anatomy.

        Raises:
            UnsupportedModelError: (a ``TypeError``) If no adapter supports the model and
                the overrides do not describe it.

        Example:
            >>> import timm
            >>> model = timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=2)
            >>> anatomy = ViTAnatomy.from_model(model)
            >>> len(anatomy.blocks), anatomy.num_prefix_tokens, anatomy.grid_size((224, 224))
            (2, 1, (14, 14))
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        adapter = find_adapter(model)
        found = adapter.parts(model) if adapter is not None else {}
        overrides = dict(
            blocks=list(blocks) if blocks is not None else None,
            norm=norm,
            heads=None if head is None else _as_heads(head),
            num_prefix_tokens=num_prefix_tokens,
            patch_size=None if patch_size is None else pair(patch_size),
            img_size=None if img_size is None else pair(img_size),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        parts = {**found, **given, "overrides": tuple(given)}
        missing = [k for k in ("blocks", "norm", "heads", "num_prefix_tokens", "patch_size")]
        missing = [k for k in missing if parts.get(k) is None]
        if missing:
            raise UnsupportedModelError(
                f"cannot find the ViT anatomy of {type(model).__name__}: looked for "
                f"{looked_for()}; missing {missing}. Pass them explicitly, e.g. "
                "ClassSpaceSaliency(model, blocks=..., norm=..., head=..., "
                "num_prefix_tokens=..., patch_size=...)"
            )
        if blocks is not None:  # custom blocks: find branches by timm naming where possible
            parts.update(_custom_block_parts(parts["blocks"]))
        if len(parts["blocks"]) == 0:
            raise UnsupportedModelError(f"{type(model).__name__} has no transformer blocks")
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
        return patch_grid(input_size, self.patch_size, self.img_size, self.dynamic_pad)

    def prefix_tokens_at(self, block: int) -> int:
        """Prefix tokens in front of the image tokens in ``block``'s tokens (0 before
        ``prefix_from_block``)."""
        return self.num_prefix_tokens if block >= self.prefix_from_block else 0

    @property
    def cls_blocks(self) -> list[int]:
        """Blocks whose tokens include the [CLS] the head reads (none for pooled heads)."""
        if self.readout.cls_index is None:
            return []
        return list(range(self.prefix_from_block, self.depth))

    def image_tokens(
        self, tokens: torch.Tensor, block: int, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The image tokens (B, h*w, ...) of ``block``'s tokens (B, N, ...).

        Args:
            tokens: Token states or scores of one block.
            block: The block index (from 0).
            grid: The patch grid (h, w); if given, the token count is checked against it.

        Raises:
            UnsupportedModelError: If a supported model's block holds another number of
                tokens than its prefix tokens and the patch grid make (its token layout is
                not what its adapter describes).
            ValueError: The same for a custom anatomy (its ``num_prefix_tokens`` or
                ``patch_size`` is wrong).
        """
        prefix = self.prefix_tokens_at(block)
        if grid is not None and tokens.shape[1] != prefix + grid[0] * grid[1]:
            self._token_count_error(f"block {block}", tokens.shape[1], grid, prefix)
        return tokens[:, prefix:]

    def count_prefix(self, count: int, grid: tuple[int, int], where: str) -> int:
        """Prefix tokens of a layer output with ``count`` tokens on the patch ``grid``: 0 (a
        block before the prefix tokens join) or ``num_prefix_tokens``.

        Raises:
            UnsupportedModelError / ValueError: As :meth:`image_tokens`, for any other count.
        """
        prefix = count - grid[0] * grid[1]
        if prefix not in (0, self.num_prefix_tokens):
            self._token_count_error(where, count, grid, self.num_prefix_tokens)
        return prefix

    def _token_count_error(
        self, where: str, count: int, grid: tuple[int, int], prefix: int
    ) -> None:
        message = (
            f"{where} of {type(self.model).__name__} holds {count} tokens, but {prefix} prefix "
            f"tokens and the {grid} patch grid of the input make {prefix + grid[0] * grid[1]}"
        )
        if self.family == "custom" or self.overrides:
            raise ValueError(f"{message}; check num_prefix_tokens/patch_size")
        raise UnsupportedModelError(
            f"{message}: its token layout is not the one the {self.family} adapter describes"
        )

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

    def logits(self, output: Any) -> torch.Tensor:
        """The logits (B, C) in the model's output (Hugging Face outputs: ``.logits``)."""
        return output if self.output_logits is None else self.output_logits(output)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the model and return its logits (B, C)."""
        return self.logits(self.model(inputs))

    def read_rows(self, matrix: torch.Tensor) -> torch.Tensor:
        """The rows of a token-to-token matrix (B, N, N) that the head reads, at image columns.

        Returns:
            (B, N - num_prefix_tokens): the mean of the read rows (see :class:`Readout`);
            prefix columns ([CLS], distillation, registers) are dropped.
        """
        return self.readout.select(matrix)[:, self.num_prefix_tokens :]

    # ------------------------------------------------------------------ hooks
    def branch_module(self, component: str, block: int) -> nn.Module:
        """The module whose output is ``component`` of ``block``.

        Raises:
            ValueError: For an unknown component.
            UnsupportedModelError: For a component this model does not expose.
        """
        if component == "residual":
            return self.blocks[block]
        table = {"attention": self.attention_branches, "mlp": self.mlp_branches}
        if component not in table:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        modules = table[component]
        if modules is None or modules[block] is None:
            reason = "its blocks have no recognised attention/MLP branch modules"
            if component == "attention" and self.attention_reason:
                reason = self.attention_reason
            raise UnsupportedModelError(
                f"component {component!r} is not available for {type(self.model).__name__}: "
                f"{reason}"
            )
        return modules[block]

    @contextlib.contextmanager
    def capture(
        self,
        components: Sequence[tuple[str, int]] = (),
        attention: Sequence[int] = (),
        reduce: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None,
        inputs: Sequence[tuple[str, int]] = (),
        modules: Mapping[tuple[str, int], tuple[nn.Module, str]] | None = None,
    ) -> Iterator[Capture]:
        """Record token states, attention probabilities and module inputs in the next forward.

        Inside the context the model is in eval mode and fused attention is off (timm
        ``fused_attn``, Hugging Face ``config._attn_implementation``) where attention is
        captured; on exit (also on an exception) every hook is removed and every
        ``training`` and attention flag is restored.

        Args:
            components: ``(component, block)`` pairs to record (a component of
                :data:`COMPONENTS`: the block output, or the attention or MLP branch after
                layer scale).
            attention: Blocks whose post-softmax attention probabilities to record.
            reduce: Optional ``f(kind, block, tensor) -> tensor`` applied inside the hook so
                that only its (smaller) result is kept; ``kind`` is the component for token
                states, ``"probabilities"`` for attention and ``"block_input"`` /
                ``"attention_input"`` for inputs.
            inputs: ``(site, block)`` pairs whose module input to record: ``"block"`` (the
                residual stream entering the block; block 0's is the embedding) or
                ``"attention"`` (the normalised tokens the attention module reads).
            modules: Further sites ``{(name, block): (module, "input" | "output")}``: the
                token input or the output of any submodule (e.g. the keys of an MLP's
                memories, its first linear's output), kept in ``tokens[(name, block)]``.

        Yields:
            A :class:`Capture`, filled by the forward pass run inside the context.

        Example:
            >>> anatomy = ViTAnatomy.from_model(model)
            >>> with anatomy.capture([("residual", -1)], inputs=[("block", 0)]) as cap:
            ...     cap.output = model(images)
            >>> cap.tokens[("residual", anatomy.depth - 1)].shape  # (B, N, D)
            torch.Size([3, 17, 32])
        """
        with _hooks.capture(self, components, attention, reduce, inputs, modules) as result:
            yield result

    @contextlib.contextmanager
    def intervene(
        self,
        outputs: Mapping[nn.Module, Edit] | None = None,
        inputs: Mapping[nn.Module, Edit] | None = None,
        attention: Mapping[int, Edit] | None = None,
    ) -> Iterator[None]:
        """Read or replace module outputs, module inputs and attention probabilities.

        Each edit ``f(tensor)`` returns a replacement or ``None`` (keep it). Attention edits
        see the post-softmax probabilities (B, heads, N, N) before they weigh the values. On
        exit (also on an exception) every hook, fused-attention flag and attention
        implementation is restored; nested contexts apply their edits in the order entered.
        The training mode is left as it is.

        Args:
            outputs: ``{module: edit}`` of module outputs (a tuple's first element).
            inputs: ``{module: edit}`` of modules' first positional input.
            attention: ``{block: edit}`` of post-softmax attention probabilities.

        Raises:
            UnsupportedModelError: Where attention probabilities cannot be edited.

        Example:
            >>> anatomy = ViTAnatomy.from_model(model)
            >>> uniform = lambda probs: torch.full_like(probs, 1 / probs.shape[-1])
            >>> with anatomy.intervene(attention={0: uniform}):
            ...     edited = model(images)
            >>> bool((edited != model(images)).any())  # restored on exit
            True
        """
        with _hooks.intervene(self, outputs, inputs, attention):
            yield


def patch_grid(
    input_size: Sequence[int],
    patch_size: tuple[int, int],
    img_size: tuple[int, int] | None = None,
    dynamic_pad: bool = False,
) -> tuple[int, int]:
    """Patch grid (h, w) of an input of spatial size (..., H, W).

    Args:
        input_size: The input's shape or spatial size; the last two entries are (H, W).
        patch_size: (ph, pw) in pixels.
        img_size: The fixed input size of the model, or ``None`` for any size.
        dynamic_pad: Whether the model pads inputs up to a multiple of the patch.

    Raises:
        ValueError: If the model has a fixed input size and ``input_size`` differs, or
            the size is smaller than one patch.
    """
    height, width = int(input_size[-2]), int(input_size[-1])
    ph, pw = patch_size
    if img_size is not None and (height, width) != img_size:
        raise ValueError(
            f"inputs must have spatial size {img_size} for this fixed-size model "
            f"(patch {patch_size}), got {(height, width)}; resize the images or build "
            "a timm model with dynamic_img_size=True"
        )
    if height < ph or width < pw:
        raise ValueError(f"inputs of size {(height, width)} are smaller than one patch")
    if dynamic_pad:
        return (math.ceil(height / ph), math.ceil(width / pw))
    return (height // ph, width // pw)


# ---------------------------------------------------------------------------- custom models
def _as_heads(head: nn.Module | Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    return (head,) if isinstance(head, nn.Module) else tuple(head)


def _custom_block_parts(blocks: Sequence[nn.Module]) -> dict:
    """Branches, layer scales and attention modules of timm-style custom blocks."""
    attention_modules = [getattr(b, "attn", None) for b in blocks]
    usable = all(m is not None and hasattr(m, "attn_drop") for m in attention_modules)
    return dict(
        attention_modules=attention_modules if usable else None,
        attention_kind="timm",
        prefix_from_block=0,
        **timm_block_parts(blocks, stem=None),
    )
