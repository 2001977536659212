"""Image classifiers that no adapter supports (a CNN, ...): what the controls and Grad-CAM
need of them, which is neither blocks nor tokens.

:class:`ImageGrid` stands in for :class:`~class_space_saliency.anatomy.ViTAnatomy`: the map
grid, the number of classes (read from the model where it declares it), the logits and the
eval-mode switch that every method's hooks use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _hooks
from ..adapters.base import pair
from ..adapters.hf import hf_logits
from ..anatomy import patch_grid

_HEAD_NAMES = ("fc", "classifier", "head")


def declared_num_classes(model: nn.Module) -> int | None:
    """The number of classes a model declares, or ``None``.

    Read from, in order: an int ``num_classes`` attribute (timm, torchvision ViT), a Hugging
    Face ``config.num_labels``, or a linear head named ``fc``, ``classifier`` or ``head``
    (the last layer where it is an ``nn.Sequential``; torchvision ResNet, VGG, DenseNet).

    Example:
        >>> import torchvision
        >>> declared_num_classes(torchvision.models.resnet18(num_classes=7))
        7
    """
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    if isinstance(labels, int) and labels > 0:
        return labels
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Sequential) and len(head) > 0:
            head = head[-1]
        if isinstance(head, nn.Linear):
            return head.out_features
    return None


@dataclass
class ImageGrid:
    """The anatomy of an image classifier that no adapter supports.

    Attributes:
        model: The classifier.
        patch_size: (ph, pw): pixels per map cell.
        num_classes: Classes of the model (for target validation).
        in_chans: Input channels, where known.
        modules: Every module of ``model``, listed once (the training flags that
            :meth:`capture` switches and restores).
    """

    model: nn.Module
    patch_size: tuple[int, int]
    num_classes: int
    in_chans: int | None = None
    modules: tuple[nn.Module, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.modules = tuple(self.model.modules())

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        patch_size: int | Sequence[int],
        num_classes: int | None = None,
    ) -> ImageGrid:
        """The grid of ``model`` with cells of ``patch_size`` pixels.

        Args:
            model: Any image classifier.
            patch_size: Pixels per map cell (int or (ph, pw)).
            num_classes: Its classes; default: :func:`declared_num_classes`.

        Raises:
            ValueError: For a ``num_classes`` that is not a positive int, or none given
                where the model declares none.
        """
        if num_classes is None:
            num_classes = declared_num_classes(model)
            if num_classes is None:
                raise ValueError(
                    f"{type(model).__name__} does not say how many classes it has (no "
                    "num_classes, config.num_labels or linear fc/classifier/head); pass "
                    "num_classes="
                )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        return cls(model, pair(patch_size), num_classes)

    def grid_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        """Map grid (h, w) of an input of spatial size (H, W) (floor division)."""
        return patch_grid(input_size, self.patch_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the model and return its logits (B, C) (Hugging Face outputs: ``.logits``)."""
        return hf_logits(self.model(inputs))

    @contextlib.contextmanager
    def capture(self) -> Iterator[_hooks.Capture]:
        """Eval mode for the length of a ``with`` block (nothing is recorded); the training
        flags are restored on exit, also on an exception."""
        with _hooks.capture(self) as result:
            yield result
