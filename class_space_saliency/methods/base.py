"""The Captum-style base every saliency method derives from, the options base, and the
metadata the registry keeps of each method (:class:`MethodInfo`).

A method is a :class:`SaliencyMethod` subclass with an ``Options`` dataclass (its settings,
declared once) and a ``_attribute`` hook (its computation on one validated chunk). The
base owns the single, final :meth:`SaliencyMethod.attribute`: it validates inputs, targets
and per-call option overrides, chunks the batch, and upsamples or shapes the maps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, final

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import nn

from .._validation import TargetType, check_choice, check_inputs, check_target
from ..adapters import UnsupportedModelError
from ..anatomy import ViTAnatomy
from ..classes import class_index
from ._attention import check_attention_support

ANATOMY_ARGUMENTS = ("blocks", "norm", "head", "num_prefix_tokens", "patch_size", "img_size")
"""Constructor keywords that describe a custom model (see ``ViTAnatomy.from_model``)."""


UPSAMPLE_MODES = ("bilinear", "nearest")
"""How patch maps become pixel maps: ``"bilinear"`` (``align_corners=False``, as Chefer et
al.'s code) or ``"nearest"`` (every pixel takes its patch's value: patch-aligned)."""


def upsample_maps(maps: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Upsample (B, K, h, w) patch maps to (B, K, H, W) (or (B, ..., h, w) to (B, ..., H, W)).

    Bilinear interpolation is computed in float64 and rounded to the maps' dtype (float32
    kernels give pixels of mathematically equal value, e.g. the clamped border rows, values
    that differ in the last bit, and which of them wins then depends on float noise of the
    map; in float64 they round to one value). Devices without float64 (MPS) interpolate in
    the maps' dtype.

    Args:
        maps: (B, K, h, w) floating-point maps, or (B, ..., h, w) (e.g. per block and head).
        size: Output (H, W).
        mode: One of :data:`UPSAMPLE_MODES`.

    Returns:
        (B, K, H, W) maps of the input's dtype ((B, ..., H, W) for more leading dimensions).

    Example:
        >>> patches = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
        >>> upsample_maps(patches, (4, 4))[0, 0, 0]
        tensor([0.0000, 0.2500, 0.7500, 1.0000])
        >>> upsample_maps(patches, (4, 4), "nearest")[0, 0, 0]
        tensor([0., 0., 1., 1.])
    """
    check_choice("mode", mode, UPSAMPLE_MODES)
    if maps.dim() > 4:  # (B, L, H, h, w) per-head maps: one (B, L*H, h, w) interpolation
        flat = upsample_maps(maps.flatten(1, -3), size, mode)
        return flat.reshape(*maps.shape[:-2], *flat.shape[-2:])
    if mode == "nearest":
        return F.interpolate(maps, size=tuple(size), mode="nearest")
    exact = maps if maps.device.type == "mps" else maps.double()
    up = F.interpolate(exact, size=tuple(size), mode="bilinear", align_corners=False)
    return up.to(maps.dtype)


def tokens_to_grid(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Reshape per-image-token values (B, h*w) to (B, h, w), checking the count."""
    if values.shape[-1] != grid[0] * grid[1]:
        raise ValueError(
            f"the model produced {values.shape[-1]} image tokens, but the patch grid of the "
            f"input is {grid} ({grid[0] * grid[1]} tokens); check num_prefix_tokens/patch_size"
        )
    return values.reshape(values.shape[0], *grid)


def input_shaped_maps(maps: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) maps -> (B, C, H, W): upsampled to ``inputs`` and repeated over channels.

    Captum's metrics (``infidelity``) and Quantus-style code expect attributions with the
    shape of the inputs; every channel of a pixel gets the map value of that pixel.
    """
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(
            f"input_shaped=True needs one map per image, got maps of shape {tuple(maps.shape)} "
            "(per_layer=True or per_head=True cannot be combined with input_shaped=True)"
        )
    if maps.shape[-2:] != inputs.shape[-2:]:
        maps = upsample_maps(maps, inputs.shape[-2:])
    return maps.expand(-1, inputs.shape[1], -1, -1).contiguous()


def _resolve_target_names(target: object, class_names: Sequence[str] | None) -> TargetType:
    """Class names in ``target`` (a str or a list of str) -> class indices."""
    names = [target] if isinstance(target, str) else target
    if not isinstance(names, (list, tuple)) or not any(isinstance(n, str) for n in names):
        return target
    if class_names is None:
        raise TypeError(
            f"target {target!r} is a class name, but this explainer knows no class names; "
            "pass class_names=... to the explainer (e.g. preprocessing.class_names) or an index "
            "from Preprocessing.class_index"
        )
    indices = [class_index(n, class_names) if isinstance(n, str) else n for n in names]
    return indices[0] if isinstance(target, str) else indices


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: a frozen dataclass, validated in ``__post_init__``.

    A method declares its options once, as fields of a subclass; they are its constructor's
    keywords (and, in field order, its positional arguments after ``model``) and its
    per-call overrides in ``attribute(..., name=value)``. ``__post_init__`` checks what
    needs no model (types, choices); ``SaliencyMethod._resolve_options`` what does (block
    indices).
    """


def _bind_options(
    method: type[SaliencyMethod], args: tuple, given: Mapping[str, Any], caller: str
) -> dict[str, Any]:
    """Positional values (in field order) and keywords -> ``{option: value}``."""
    order = method._option_order
    if len(args) > len(order):
        raise TypeError(
            f"{caller} takes at most {len(order)} positional option(s) {order}, "
            f"got {len(args)}: {args!r}"
        )
    bound = dict(zip(order, args, strict=False))
    twice = sorted(bound.keys() & given.keys())
    if twice:
        raise TypeError(f"{caller} got multiple values for option(s) {twice}")
    bound.update(given)
    return bound


class SaliencyMethod(Attribution):
    """Base of all methods: ``attribute(inputs, target)`` -> (B, 1, h, w) patch maps.

    Subclasses declare ``Options`` (a frozen :class:`MethodOptions` dataclass) and implement
    ``_attribute(inputs, target, grid, options)`` for one chunk of validated inputs; they
    never define ``attribute``. Registered methods (see :func:`~.registry.register_method`)
    also get their model checked at construction (attention probabilities, a [CLS] token).

    Every ``attribute`` takes ``input_shaped=True`` (maps upsampled to the input and
    repeated over its channels, (B, C, H, W), for Captum's ``infidelity`` and similar
    metrics) and class names as ``target`` where the explainer knows them.

    Args:
        model: A supported ViT (see :class:`~class_space_saliency.anatomy.ViTAnatomy`).
        *args: Options in the order of the ``Options`` fields.
        class_names: Names of the model's classes, so that targets can be given by name
            (case-insensitive; any synonym of an ImageNet description).
        **kwargs: Options by name, and ``blocks``, ``norm``, ``head``,
            ``num_prefix_tokens``, ``patch_size``, ``img_size`` for custom models.

    Raises:
        TypeError: For an unknown keyword, naming the method's options.
    """

    Options: ClassVar[type[MethodOptions]] = MethodOptions
    """The method's options (a frozen dataclass); subclasses set their own."""

    info: ClassVar[MethodInfo | None] = None
    """Registry metadata, set by :func:`~.registry.register_method`."""

    cost: ClassVar[str] = ""
    """What one call costs (``MethodInfo.cost``), set by :func:`~.registry.register_method`."""

    model_arguments: ClassVar[tuple[str, ...]] = ANATOMY_ARGUMENTS
    """Constructor keywords that describe the model rather than set an option."""

    _option_order: ClassVar[tuple[str, ...]] = ()
    _option_names: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "attribute" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} defines attribute(), which SaliencyMethod owns (it is final): "
                "declare the options in an Options dataclass and implement "
                "_attribute(inputs, target, grid, options) instead"
            )
        if not (
            isinstance(cls.Options, type)
            and issubclass(cls.Options, MethodOptions)
            and dataclasses.is_dataclass(cls.Options)
        ):
            raise TypeError(
                f"{cls.__name__}.Options must be a dataclass subclassing MethodOptions, "
                f"got {cls.Options!r}"
            )
        cls._option_order = tuple(f.name for f in dataclasses.fields(cls.Options))
        cls._option_names = frozenset(cls._option_order)
        clash = cls._option_names & {*cls.model_arguments, "class_names", "model"}
        if clash:
            raise TypeError(f"{cls.__name__}.Options fields {sorted(clash)} are reserved names")

    def __init__(
        self,
        model: nn.Module,
        *args: Any,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model)
        name = type(self).__name__
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in self._option_names}
        unknown = sorted(set(kwargs) - set(self.model_arguments))
        if unknown:
            raise TypeError(
                f"{name}() got unknown argument(s) {unknown}; its options are "
                f"{list(self._option_order)} and the model's parts "
                f"{list(self.model_arguments)}"
            )
        options = _bind_options(type(self), args, options, f"{name}()")
        self.model = model
        self.class_names = None if class_names is None else tuple(class_names)
        self.anatomy = self._build_anatomy(model, **kwargs)
        self._num_classes: int | None = None
        self._check_model()
        self.options = self._resolve_options(self.Options(**options))

    # ------------------------------------------------------------------ hooks for subclasses
    def _build_anatomy(self, model: nn.Module, **parts: Any) -> Any:
        """The model's anatomy (the controls accept any image classifier here)."""
        return ViTAnatomy.from_model(model, **parts)

    def _check_model(self) -> None:
        """Raise ``UnsupportedModelError`` where the model lacks what ``info`` says is needed."""
        info = type(self).info
        if info is None:
            return
        name = type(self).__name__
        if info.needs_cls and self.anatomy.readout.cls_index is None:
            raise UnsupportedModelError(
                f"{name} needs a [CLS] token that the classifier head reads; the head of "
                f"{type(self.model).__name__} reads {self.anatomy.readout.describe()} (pooled "
                "image tokens; a [CLS] or register token there never reaches the head); use "
                "ClassSpaceSaliency instead"
            )
        if info.needs_cls and not self.anatomy.cls_blocks:
            raise UnsupportedModelError(
                f"{name} needs the [CLS] token that the classifier head reads in the blocks' "
                f"tokens; the [CLS] of {type(self.model).__name__} joins only after its last "
                "block (in class-attention blocks); use ClassSpaceSaliency instead"
            )
        if info.needs_attention:
            differentiable = info.needs_gradients
            check_attention_support(name, self.anatomy, self.model, differentiable)

    def _resolve_options(self, options: MethodOptions) -> MethodOptions:
        """Check and normalise what depends on the model (e.g. block indices)."""
        return options

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: MethodOptions,
    ) -> torch.Tensor:
        """Maps (B, K, h, w) for one validated chunk; ``target`` None = predicted class."""
        raise NotImplementedError(f"{type(self).__name__} implements no _attribute")

    # ------------------------------------------------------------------ public surface
    def __getattr__(self, name: str) -> Any:
        """Options read as attributes: ``explainer.layer`` is ``explainer.options.layer``."""
        options = self.__dict__.get("options")
        if options is not None and name in type(self)._option_names:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def num_classes(self) -> int:
        """Number of classes of the model's head."""
        if self._num_classes is None:
            self._num_classes = self.anatomy.num_classes
        return self._num_classes

    def has_convergence_delta(self) -> bool:
        """Captum API: these methods have no convergence delta."""
        return False

    def replace_options(self, *args: Any, **overrides: Any) -> MethodOptions:
        """This explainer's options with ``overrides`` applied and validated.

        Args:
            *args: Values in the order of the ``Options`` fields.
            **overrides: Options by name; ``None`` keeps the explainer's value.

        Returns:
            A new options object (the explainer's own is unchanged).

        Raises:
            TypeError: For an unknown option name (naming it) or a value of the wrong type.
            ValueError: For a value out of its range or choices.
        """
        caller = f"{type(self).__name__}.attribute()"
        unknown = sorted(set(overrides) - self._option_names)
        if unknown:
            raise TypeError(
                f"{caller} got unknown option(s) {unknown}; the options of "
                f"{type(self).__name__} are {list(self._option_order)}"
            )
        given = _bind_options(type(self), args, overrides, caller)
        given = {name: value for name, value in given.items() if value is not None}
        if not given:
            return self.options
        return self._resolve_options(dataclasses.replace(self.options, **given))

    def _attribute_all(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        target: TargetType = None,
        *args: Any,
        upsample: bool = False,
        max_batch_size: int | None = None,
        input_shaped: bool = False,
        **overrides: Any,
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Saliency maps for ``inputs`` (the body of :meth:`attribute`)."""
        if isinstance(inputs, tuple):  # Captum passes 1-tuples of tensors; answer in kind
            if len(inputs) != 1:
                raise ValueError(f"inputs must be one tensor (or a 1-tuple), got {len(inputs)}")
            maps = self._attribute_all(
                inputs[0],
                target,
                *args,
                upsample=upsample,
                max_batch_size=max_batch_size,
                input_shaped=input_shaped,
                **overrides,
            )
            return (maps,)
        options = self.replace_options(*args, **overrides) if args or overrides else self.options
        for name, flag in (("upsample", upsample), ("input_shaped", input_shaped)):
            if flag is not True and flag is not False:
                raise TypeError(f"{name} must be a bool (True or False), got {flag!r}")
        grid = check_inputs(inputs, self.anatomy)
        batch = inputs.shape[0]
        if target is not None and not isinstance(target, (int, torch.Tensor)):
            target = _resolve_target_names(target, self.class_names)
        targets = check_target(target, batch, self.num_classes)
        if max_batch_size is None:
            max_batch_size = batch
        elif isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int or None, got {max_batch_size!r}")
        elif max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if targets is not None and targets.device != inputs.device:
            targets = targets.to(inputs.device)
        if max_batch_size >= batch:
            maps = self._attribute(inputs, targets, grid, options).float()
        else:
            chunks = []
            for start in range(0, batch, max_batch_size):
                part = slice(start, start + max_batch_size)
                chunk_target = None if targets is None else targets[part]
                chunks.append(self._attribute(inputs[part], chunk_target, grid, options).float())
            maps = torch.cat(chunks)
        if maps.device != inputs.device:
            maps = maps.to(inputs.device)
        if input_shaped:
            return input_shaped_maps(maps, inputs)
        return upsample_maps(maps, inputs.shape[-2:]) if upsample else maps

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *args: Any,
        upsample: bool = False,
        max_batch_size: int | None = None,
        input_shaped: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """Saliency maps for ``inputs``.

        Args:
            inputs: Normalised images (B, C, H, W) (or a 1-tuple of them, as Captum passes).
            target: Class per example: ``None`` (predicted class), an int, a list of ints or
                a 1-D int tensor of length B; class names where the explainer knows them.
                Class-agnostic methods validate it and otherwise ignore it.
            *args: Option overrides for this call, in the order of the ``Options`` fields
                (e.g. ``layer`` of :class:`ClassSpaceSaliency`).
            upsample: Return (B, K, H, W) maps, bilinearly upsampled to the input size.
            max_batch_size: Images per forward pass (bounded memory for large batches).
            input_shaped: Return (B, C, H, W): the map upsampled to the input and repeated
                over its channels (Captum's ``infidelity`` and similar metrics).
            **options: Option overrides for this call, by name (``None`` keeps the
                explainer's value); see the method's ``Options``.

        Returns:
            float32 maps (B, 1, h, w) on the input's device (B, K, h, w where an option asks
            for K maps per image, e.g. ``per_layer``; B, L, H, h, w for ``per_head``); higher
            = more important.

        Raises:
            TypeError: For inputs or targets of the wrong type, an unknown option or an
                option of the wrong type (each naming the argument).
            ValueError: For a wrong shape, size or channel count, NaN/inf, a target out of
                range or of the wrong length, or an option value outside its choices.

        Example:
            >>> import timm, torch
            >>> from class_space_saliency import create_method
            >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
            ...                           depth=2, num_classes=5)
            >>> explainer = create_method("class_space", model)
            >>> explainer.attribute(torch.randn(2, 3, 32, 32), target=[1, 4]).shape
            torch.Size([2, 1, 4, 4])
            >>> explainer.attribute(torch.randn(2, 3, 32, 32), layer="all", per_layer=True).shape
            torch.Size([2, 2, 4, 4])
            >>> explainer.attribute(torch.randn(1, 3, 32, 32), colour="red")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            TypeError: ClassSpaceSaliency.attribute() got unknown option(s) ['colour']; ...
        """
        return self._attribute_all(
            inputs,
            target,
            *args,
            upsample=upsample,
            max_batch_size=max_batch_size,
            input_shaped=input_shaped,
            **options,
        )


def _final_for_captum(attribute: Any) -> Any:
    """``attribute`` marked final, with the ``__wrapped__`` Captum's wrappers call.

    Captum's ``NoiseTunnel`` calls ``attribute.__wrapped__`` (its own methods carry a
    logging decorator); here that is the undecorated function itself.
    """

    @functools.wraps(attribute)
    def wrapper(self: SaliencyMethod, *args: Any, **kwargs: Any) -> Any:
        return attribute(self, *args, **kwargs)

    return final(wrapper)


SaliencyMethod.attribute = _final_for_captum(SaliencyMethod.attribute)


FLAGS = (
    "needs_gradients",
    "class_specific",
    "needs_attention",
    "needs_cls",
    "model_agnostic",
    "needs_fitting",
)
"""The boolean fields of :class:`MethodInfo`, each a filter of :func:`list_methods`."""

COSTS = ("no model pass", "forward only", "forward + backward")
"""What one call costs, coarsely (``MethodInfo.cost``)."""


@dataclass(frozen=True)
class MethodInfo:
    """What code needs to know about a registered method.

    Attributes:
        name: The registry name.
        method: The :class:`~.base.SaliencyMethod` subclass.
        needs_gradients: Takes gradients (a backward pass); the others run under
            ``torch.no_grad()`` unless asked for a graph.
        class_specific: The map depends on ``target``; class-agnostic methods validate
            the target and otherwise ignore it.
        needs_attention: Reads post-softmax attention probabilities (differentiable ones
            where it also needs gradients); checked when the method is built.
        needs_cls: Needs a [CLS] token that the head reads; checked when it is built.
        model_agnostic: Never runs the model (controls); works on any image classifier.
        needs_fitting: Built from parameters fitted beforehand on the model's token states
            (``linear_probe``'s ``probes=``): ``create_method`` needs them, so code that
            builds methods from their names alone lists ``needs_fitting=False``.
        fixed_options: Options a named variant fixes (empty for a registered method).
        variant_of: The registered method a variant builds, else ``None``.
    """

    name: str
    method: type[SaliencyMethod]
    needs_gradients: bool = False
    class_specific: bool = True
    needs_attention: bool = False
    needs_cls: bool = False
    model_agnostic: bool = False
    needs_fitting: bool = False
    fixed_options: Mapping[str, Any] = field(default_factory=dict)
    variant_of: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a method name must be an identifier, got {self.name!r}")
        if not (isinstance(self.method, type) and issubclass(self.method, SaliencyMethod)):
            raise TypeError(f"{self.name!r} must be a SaliencyMethod subclass, got {self.method}")
        for flag in FLAGS:
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.model_agnostic and (self.needs_gradients or self.needs_attention):
            raise ValueError(f"{self.name!r}: a model-agnostic method cannot need the model")
        object.__setattr__(self, "fixed_options", MappingProxyType(dict(self.fixed_options)))

    @property
    def cost(self) -> str:
        """One of :data:`COSTS`, from the flags."""
        if self.model_agnostic:
            return COSTS[0]
        return COSTS[2] if self.needs_gradients else COSTS[1]

    @property
    def options(self) -> tuple[str, ...]:
        """The option names the method takes (its ``Options`` fields), in order."""
        return self.method._option_order
