"""The Captum-style base every saliency method in this package derives from."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import nn

from .._validation import TargetType, check_inputs, check_target
from ..anatomy import ViTAnatomy


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


class SaliencyMethod(Attribution):
    """Base of all methods: ``attribute(inputs, target)`` -> (B, 1, h, w) patch maps.

    Subclasses implement :meth:`_attribute` for one chunk of validated inputs; the base
    validates inputs and targets (Captum conventions), splits batches into chunks of
    ``max_batch_size``, optionally upsamples to the input resolution and returns the maps
    as float32 on the input's device.

    Args:
        model: A supported ViT (see :class:`~class_space_saliency.anatomy.ViTAnatomy`).
        **anatomy_overrides: ``blocks``, ``norm``, ``head``, ``num_prefix_tokens``,
            ``patch_size``, ``img_size`` for custom models.
    """

    cost: str = ""
    """What one call costs, e.g. ``"forward only"`` (quoted in the README)."""

    def __init__(self, model: nn.Module, **anatomy_overrides) -> None:
        super().__init__(model)
        self.model = model
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
                a 1-D int tensor of length B.
            upsample: Return (B, 1, H, W) maps, bilinearly upsampled to the input size.
            max_batch_size: Images per forward pass (bounded memory for large batches).

        Returns:
            float32 maps (B, 1, h, w) on the input's device; higher = more important.
        """
        return self._attribute_batched(inputs, target, upsample, max_batch_size)
