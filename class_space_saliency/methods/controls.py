"""Control maps that know nothing of the model: random noise, Sobel edges, brightness.

A faithful method must beat them; they validate inputs like every method (the model's
anatomy gives the patch grid and the number of classes) but never run the model. They work
on any image classifier: models that no adapter supports (a CNN, ...) name the grid,
``SobelSaliency(cnn, patch_size=8)``, and the classes where the model does not declare them
(timm and torchvision models do: ``num_classes``, a linear ``fc`` / ``classifier`` / ``head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._seeding import image_generator
from ..adapters import UnsupportedModelError
from ..anatomy import ViTAnatomy
from ._any_model import ImageGrid
from .base import ANATOMY_ARGUMENTS, MethodOptions, SaliencyMethod
from .registry import register_method

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def pool_to_grid(
    values: torch.Tensor, grid: tuple[int, int], patch_size: tuple[int, int]
) -> torch.Tensor:
    """Average pixel values (B, 1, H, W) over each patch of the grid -> (B, 1, h, w).

    Pixels beyond the grid are cropped (as a strided patch embedding ignores them); a grid
    that overhangs the image (timm ``dynamic_img_pad``) is padded with zeros, as the model
    pads the image.
    """
    (h, w), (ph, pw) = grid, patch_size
    values = values[..., : h * ph, : w * pw]
    pad_h, pad_w = h * ph - values.shape[-2], w * pw - values.shape[-1]
    if pad_h or pad_w:
        values = F.pad(values, (0, pad_w, 0, pad_h))
    return F.avg_pool2d(values, (ph, pw))


class ControlSaliency(SaliencyMethod):
    """Base of the controls: a supported model's anatomy, or any model with a named grid.

    Args:
        model: Any image classifier.
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: The control's options, ``class_names``, ``patch_size`` (int or
            (ph, pw); needed for a model that no adapter supports), ``num_classes`` (for such
            a model where it does not declare them, see
            :func:`~._any_model.declared_num_classes`) and, for supported models, parts of a
            custom ViT (see ``ViTAnatomy.from_model``).

    Raises:
        UnsupportedModelError: For an unsupported model without ``patch_size``.
        ValueError: For such a model that declares no classes, without ``num_classes``.
    """

    model_arguments = (*ANATOMY_ARGUMENTS, "num_classes")

    def _build_anatomy(
        self, model: nn.Module, num_classes: int | None = None, **parts
    ) -> ViTAnatomy | ImageGrid:
        try:
            return super()._build_anatomy(model, **parts)
        except UnsupportedModelError as error:
            patch_size = parts.get("patch_size")
            if patch_size is None:
                raise UnsupportedModelError(
                    f"{error}. The controls work on any image classifier: pass patch_size= "
                    "(pixels per map cell), and num_classes= where the model does not declare it"
                ) from error
        return ImageGrid.from_model(model, patch_size, num_classes)


@dataclass(frozen=True)
class RandomOptions(MethodOptions):
    """Options of :class:`RandomSaliency`.

    Attributes:
        seed: The base seed of every image's generator.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")


@register_method("random", class_specific=False, model_agnostic=True)
class RandomSaliency(ControlSaliency):
    """Uniform random maps in [0, 1), seeded and reproducible.

    Each image's map comes from its own ``torch.Generator`` seeded with a hash of ``seed``
    and the image's values, so the same image gets the same map on every call, at any
    batch position, for every ``max_batch_size``, under any sharding of a data set and on
    every device; the global RNG is not touched.

    Args:
        model: Any image classifier (only its patch grid and class count are used).
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: :class:`RandomOptions` (``seed``), ``num_classes`` for a model no
            adapter supports (see :class:`ControlSaliency`), ``patch_size`` or parts of a
            custom model.

    Example:
        >>> import torch
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
        >>> random = RandomSaliency(cnn, seed=0, patch_size=8, num_classes=10)
        >>> images = torch.randn(3, 3, 32, 32)
        >>> maps = random.attribute(images)
        >>> maps.shape
        torch.Size([3, 1, 4, 4])
        >>> torch.equal(random.attribute(images[[2, 0]]), maps[[2, 0]])  # per image, any batch
        True
    """

    Options = RandomOptions

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: RandomOptions,
    ) -> torch.Tensor:
        seed = options.seed
        maps = [torch.rand((1, *grid), generator=image_generator(x, seed)) for x in inputs]
        return torch.stack(maps).to(inputs.device)


@register_method("sobel", class_specific=False, model_agnostic=True)
class SobelSaliency(ControlSaliency):
    """Edge strength: Sobel gradient magnitude of the image, averaged over each patch.

    The channel-mean image is padded by replicating its border (so the image frame is not
    an edge), filtered with the 3x3 Sobel kernels ``gx`` and ``gy = gx.T`` and the
    magnitude ``sqrt(gx² + gy²)`` is average-pooled onto the patch grid. The model is never
    run.

    Args:
        model: Any image classifier (only its patch grid and class count are used).
        **kwargs: ``num_classes`` for a model no adapter supports (see
            :class:`ControlSaliency`), ``patch_size`` or parts of a custom model.

    Example:
        >>> import torch
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
        >>> explainer = SobelSaliency(cnn, patch_size=8, num_classes=10)
        >>> explainer.attribute(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 1, 4, 4])
    """

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: MethodOptions,
    ) -> torch.Tensor:
        gray = inputs.detach().float().mean(1, keepdim=True)
        padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
        kernel_x = _SOBEL_X.to(gray.device)
        kernels = torch.stack([kernel_x, kernel_x.T])[:, None]  # (2, 1, 3, 3)
        edges = F.conv2d(padded, kernels).square().sum(1, keepdim=True).sqrt()
        return pool_to_grid(edges, grid, self.anatomy.patch_size)


@register_method("intensity", class_specific=False, model_agnostic=True)
class IntensitySaliency(ControlSaliency):
    """Brightness: the mean pixel value of each patch over all channels.

    On normalised inputs ``(x_c - mean_c) / std_c`` the map is increasing in every
    channel's raw brightness (normalisation is an increasing affine map per channel), so it
    ranks patches by brightness, each channel weighted by ``1 / std_c``. The model is never
    run.

    Args:
        model: Any image classifier (only its patch grid and class count are used).
        **kwargs: ``num_classes`` for a model no adapter supports (see
            :class:`ControlSaliency`), ``patch_size`` or parts of a custom model.

    Example:
        >>> import torch
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
        >>> explainer = IntensitySaliency(cnn, patch_size=8, num_classes=10)
        >>> explainer.attribute(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 1, 4, 4])
    """

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: MethodOptions,
    ) -> torch.Tensor:
        gray = inputs.detach().float().mean(1, keepdim=True)
        return pool_to_grid(gray, grid, self.anatomy.patch_size)
