"""The Captum-style base every saliency method in this package derives from."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import nn

from .._validation import TargetType, check_inputs, check_target
from ..anatomy import ViTAnatomy
from ..classes import class_index


def upsample_maps(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly upsample (B, K, h, w) patch maps to (B, K, H, W) (``align_corners=False``)."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


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
    if maps.shape[1] != 1:
        raise ValueError(
            f"input_shaped=True needs one map per image, got {maps.shape[1]} "
            "(per_layer=True cannot be combined with input_shaped=True)"
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


def _captum_compatible(attribute: Callable) -> Callable:
    """Wrap a subclass's ``attribute`` for Captum and for the options every method shares.

    Captum's ``NoiseTunnel`` calls ``attribute.__wrapped__`` (Captum's own methods carry a
    logging decorator), so the wrapper exposes a ``__wrapped__`` that does the full work:
    class names as targets and ``input_shaped=True``.
    """

    @functools.wraps(attribute)
    def full(self, inputs, *args, input_shaped: bool = False, **kwargs):
        if "target" in kwargs:
            kwargs["target"] = _resolve_target_names(kwargs["target"], self.class_names)
        elif args:
            args = (_resolve_target_names(args[0], self.class_names), *args[1:])
        if not isinstance(input_shaped, bool):
            raise TypeError(f"input_shaped must be a bool, got {input_shaped!r}")
        maps = attribute(self, inputs, *args, **kwargs)
        if not input_shaped:
            return maps
        if isinstance(inputs, tuple):
            return (input_shaped_maps(maps[0], inputs[0]),)
        return input_shaped_maps(maps, inputs)

    full.__signature__ = _with_input_shaped(inspect.signature(attribute))

    @functools.wraps(full)
    def outer(self, inputs, *args, **kwargs):
        return full(self, inputs, *args, **kwargs)

    return outer


def _with_input_shaped(signature: inspect.Signature) -> inspect.Signature:
    parameters = list(signature.parameters.values())
    extra = inspect.Parameter(
        "input_shaped", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool"
    )
    keep = [p for p in parameters if p.kind != inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in parameters if p.kind == inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=[*keep, extra, *rest])


class SaliencyMethod(Attribution):
    """Base of all methods: ``attribute(inputs, target)`` -> (B, 1, h, w) patch maps.

    Subclasses implement :meth:`_attribute` for one chunk of validated inputs; the base
    validates inputs and targets (Captum conventions), splits batches into chunks of
    ``max_batch_size``, optionally upsamples to the input resolution and returns the maps
    as float32 on the input's device.

    Every ``attribute`` also takes ``input_shaped=True`` (maps upsampled to the input and
    repeated over its channels, (B, C, H, W), for Captum's ``infidelity`` and similar
    metrics) and class names as ``target`` where the explainer knows them. Subclasses'
    ``attribute`` methods are wrapped for this (and for Captum's ``NoiseTunnel``)
    automatically.

    Args:
        model: A supported ViT (see :class:`~class_space_saliency.anatomy.ViTAnatomy`).
        class_names: Names of the model's classes, so that targets can be given by name
            (case-insensitive; any synonym of an ImageNet description).
        **anatomy_overrides: ``blocks``, ``norm``, ``head``, ``num_prefix_tokens``,
            ``patch_size``, ``img_size`` for custom models.
    """

    cost: str = ""
    """What one call costs, e.g. ``"forward only"`` (quoted in the README)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "attribute" in cls.__dict__:
            cls.attribute = _captum_compatible(cls.__dict__["attribute"])

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str] | None = None,
        **anatomy_overrides,
    ) -> None:
        super().__init__(model)
        self.model = model
        self.class_names = None if class_names is None else tuple(class_names)
        self.anatomy = ViTAnatomy.from_model(model, **anatomy_overrides)
        self._num_classes: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes of the model's head."""
        if self._num_classes is None:
            self._num_classes = self.anatomy.num_classes
        return self._num_classes

    def has_convergence_delta(self) -> bool:
        """Captum API: these methods have no convergence delta."""
        return False

    def _attribute_batched(
        self,
        inputs: torch.Tensor,
        target: TargetType,
        upsample: bool,
        max_batch_size: int | None,
        **options,
    ) -> torch.Tensor | tuple[torch.Tensor]:
        if isinstance(inputs, tuple):  # Captum passes 1-tuples of tensors; answer in kind
            if len(inputs) != 1:
                raise ValueError(f"inputs must be one tensor (or a 1-tuple), got {len(inputs)}")
            return (
                self._attribute_batched(inputs[0], target, upsample, max_batch_size, **options),
            )
        grid = check_inputs(inputs, self.anatomy)
        targets = check_target(target, inputs.shape[0], self.num_classes)
        if max_batch_size is None:
            max_batch_size = inputs.shape[0]
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int or None, got {max_batch_size!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        maps = []
        for start in range(0, inputs.shape[0], max_batch_size):
            chunk = slice(start, start + max_batch_size)
            chunk_target = None if targets is None else targets[chunk].to(inputs.device)
            maps.append(self._attribute(inputs[chunk], chunk_target, grid, **options).float())
        result = torch.cat(maps).to(inputs.device)
        return upsample_maps(result, inputs.shape[-2:]) if upsample else result

    def _attribute(
        self, inputs: torch.Tensor, target: torch.Tensor | None, grid: tuple[int, int], **options
    ) -> torch.Tensor:
        """Maps (B, K, h, w) for one validated chunk; ``target`` None = predicted class."""
        raise NotImplementedError

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        upsample: bool = False,
        max_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Saliency maps for ``inputs``.

        Args:
            inputs: Normalised images (B, C, H, W).
            target: Class per example: ``None`` (predicted class), an int, a list of ints or
                a 1-D int tensor of length B; class names where the explainer knows them.
            upsample: Return (B, 1, H, W) maps, bilinearly upsampled to the input size.
            max_batch_size: Images per forward pass (bounded memory for large batches).

        Returns:
            float32 maps (B, 1, h, w) on the input's device; higher = more important.
        """
        return self._attribute_batched(inputs, target, upsample, max_batch_size)

    attribute = _captum_compatible(attribute)
