"""Grad-CAM (Selvaraju et al. 2017) on ViT tokens, or on the feature maps of any image
classifier given a layer, computed by Captum's ``LayerGradCam``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from captum.attr import LayerGradCam
from torch import nn

from .._hooks import forward_hook
from .._validation import check_bool
from ..adapters import UnsupportedModelError
from ..anatomy import ViTAnatomy
from ._any_model import ImageGrid
from .base import ANATOMY_ARGUMENTS, MethodOptions, SaliencyMethod, tokens_to_grid
from .registry import register_method

_ANY_MODEL = (
    "Grad-CAM works on any image classifier given a layer: pass layer=<module>, e.g. "
    "model.layer4 of a ResNet"
)


class _TokenGrid(nn.Module):
    """Identity on image tokens laid out as (B, D, h, w): the layer Captum hooks."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid


def _target_scores(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    target: torch.Tensor | None,
) -> torch.Tensor:
    """The target logit per example (B,); ``target`` None = the predicted class."""
    logits = forward(inputs)
    if target is None:
        target = logits.argmax(-1)
    return logits.gather(1, target[:, None]).squeeze(1)


@dataclass(frozen=True)
class GradCAMOptions(MethodOptions):
    """Options of :class:`GradCAM`.

    Attributes:
        layer: A block index (the module whose output that block's attention reads: the
            norm before attention, timm ``norm1``, torchvision ``ln_1``, Hugging Face
            ``layernorm_before``; for post-norm blocks, which normalise after attention, the
            previous block; default ``-1``, the last block's, as pytorch-grad-cam
            recommends: the last block's output only reaches the head through [CLS]) or any
            submodule of the model whose output is the tokens (B, N, D) or a channels-last
            grid (B, h, w, D); the module once resolved. Models that no adapter supports (a
            CNN, ...) need the module, whose output is a feature map (B, C, h, w).
        relu: Keep only positive evidence (the original Grad-CAM); ``False`` keeps the sign.
    """

    layer: int | nn.Module = -1
    relu: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int | nn.Module):
            raise TypeError(f"layer must be a block index or an nn.Module, got {self.layer!r}")
        check_bool("relu", self.relu)


@register_method("gradcam", needs_gradients=True)
class GradCAM(SaliencyMethod):
    """Grad-CAM on the image tokens of one layer of a ViT.

    The chosen layer's token output (B, N, D) loses its prefix tokens and is laid out as a
    channel-first grid (B, D, h, w); Captum's :class:`~captum.attr.LayerGradCam` weighs
    each channel by its gradient averaged over the grid, sums over channels and applies
    ReLU (unless ``relu=False``). The gradient is that of the target logit.

    Gradients flow back only as far as the chosen layer: its output is detached before it
    re-enters the forward pass and ``torch.autograd.grad`` is taken w.r.t. the re-attached
    grid, so nothing before the layer is differentiated and no ``.grad`` is written.

    On a model that no adapter supports (a CNN, ...) it is the classic Grad-CAM of the
    module passed as ``layer``, as Captum's ``LayerGradCam`` and pytorch-grad-cam compute it;
    the map has that layer's resolution.

    Args:
        model: A supported model (ViT or Swin), or any image classifier with ``layer`` a
            module of it.
        *args: Options by position, in the order of the ``Options`` fields.
        **kwargs: :class:`GradCAMOptions` (``layer``, ``relu``), ``class_names``,
            ``num_classes`` (for a model that no adapter supports and that does not declare
            its classes) and parts of a custom model (see ``ViTAnatomy.from_model``).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                           depth=2, num_classes=5)
        >>> GradCAM(model).attribute(torch.randn(2, 3, 32, 32), target=1).shape
        torch.Size([2, 1, 4, 4])
        >>> signed = GradCAM(model, layer=model.blocks[0].norm1, relu=False)
        >>> import torchvision
        >>> cnn = torchvision.models.resnet18(num_classes=4).eval()
        >>> GradCAM(cnn, layer=cnn.layer4).attribute(torch.randn(1, 3, 64, 64), 2).shape
        torch.Size([1, 1, 2, 2])
    """

    Options = GradCAMOptions
    model_arguments = (*ANATOMY_ARGUMENTS, "num_classes")

    def _build_anatomy(
        self, model: nn.Module, num_classes: int | None = None, **parts
    ) -> ViTAnatomy | ImageGrid:
        try:
            return super()._build_anatomy(model, **parts)
        except UnsupportedModelError as error:
            self._not_a_vit = str(error)
        try:  # any image classifier: the map has the chosen layer's resolution
            return ImageGrid.from_model(model, 1, num_classes)
        except ValueError as error:
            raise UnsupportedModelError(
                f"{self._not_a_vit}. {_ANY_MODEL}, and num_classes= ({error})"
            ) from None

    def _resolve_options(self, options: GradCAMOptions) -> GradCAMOptions:
        layer = options.layer
        if isinstance(self.anatomy, ImageGrid) and not isinstance(layer, nn.Module):
            raise UnsupportedModelError(f"{self._not_a_vit}. {_ANY_MODEL}")
        if isinstance(layer, nn.Module):
            if not any(module is layer for module in self.anatomy.modules):
                raise ValueError(
                    f"layer {type(layer).__name__} is not a submodule of "
                    f"{type(self.model).__name__}; pass e.g. model.blocks[-1].norm1"
                )
            return options
        index = self.anatomy.resolve_layers(layer)[0]
        inputs = self.anatomy.attention_inputs
        if inputs is None or not isinstance(inputs[index], nn.Module):
            raise UnsupportedModelError(
                f"block {layer} ({type(self.anatomy.blocks[index]).__name__}) has no known "
                "module whose output its attention reads; pass the module to explain as layer=..."
            )
        return replace(options, layer=inputs[index])

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        options: GradCAMOptions,
    ) -> torch.Tensor:
        tokens_in = isinstance(self.anatomy, ViTAnatomy)
        channels_last = tokens_in and self.anatomy.channels_last
        view = _TokenGrid()

        def as_grid(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            dims = output.dim() if isinstance(output, torch.Tensor) else 0
            shape = f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}"
            if not tokens_in:  # any classifier: a feature map; the gradient stops here
                if dims != 4:
                    raise TypeError(f"GradCAM's layer must output (B, C, h, w), got {shape}")
                return view(output.detach())
            grid_out = channels_last and dims == 4
            if dims != 3 and not grid_out:
                raise TypeError(
                    "GradCAM's layer must output tokens (B, N, D) (or, for Swin, a "
                    f"channels-last grid (B, h, w, D)), got {shape}"
                )
            if grid_out:  # timm Swin: (B, h, w, D) is already the grid; the gradient stops here
                return view(output.detach().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            tokens = output.detach()  # the gradient stops here
            batch, count, width = tokens.shape
            # [CLS] joins some models' tokens late (ConViT, CaiT): count this layer's prefix
            prefix = self.anatomy.count_prefix(count, grid, f"layer {type(module).__name__}")
            image = tokens[:, prefix:].transpose(1, 2).reshape(batch * width, count - prefix)
            image = view(tokens_to_grid(image, grid).reshape(batch, width, *grid))
            return torch.cat([tokens[:, :prefix], image.flatten(2).transpose(1, 2)], 1)

        # capture() with nothing to record: eval mode, restored afterwards
        with forward_hook(options.layer, as_grid), self.anatomy.capture():
            forward = functools.partial(_target_scores, self.anatomy.forward)
            cam = LayerGradCam(forward, view).attribute(
                inputs.detach(), additional_forward_args=(target,), relu_attributions=options.relu
            )
        return cam.detach()
