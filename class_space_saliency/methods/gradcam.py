"""Grad-CAM (Selvaraju et al. 2017) on ViT tokens, computed by Captum's ``LayerGradCam``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from captum.attr import LayerGradCam
from torch import nn

from .._validation import TargetType
from ..adapters import UnsupportedModelError
from .base import SaliencyMethod, tokens_to_grid


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


class GradCAM(SaliencyMethod):
    """Grad-CAM on the image tokens of one layer of a ViT.

    The chosen layer's token output (B, N, D) loses its prefix tokens and is laid out as a
    channel-first grid (B, D, h, w); Captum's :class:`~captum.attr.LayerGradCam` weighs
    each channel by its gradient averaged over the grid, sums over channels and applies
    ReLU (unless ``relu=False``). The gradient is that of the target logit.

    Gradients flow back only as far as the chosen layer: its output is detached before it
    re-enters the forward pass and ``torch.autograd.grad`` is taken w.r.t. the re-attached
    grid, so nothing before the layer is differentiated and no ``.grad`` is written.

    Args:
        model: A supported model (ViT or Swin).
        layer: A block index (that block's norm before attention: timm ``norm1``,
            torchvision ``ln_1``, Hugging Face ``layernorm_before``; default ``-1``, the last
            block's, as pytorch-grad-cam recommends: the last block's output only reaches
            the head through [CLS]) or any submodule of ``model`` whose output is the tokens
            (B, N, D) or a channels-last grid (B, h, w, D).
        relu: Keep only positive evidence (the original Grad-CAM); ``False`` keeps the sign.
        **anatomy_overrides: Parts of a custom model (see ``ViTAnatomy.from_model``).

    Returns:
        ``attribute`` returns float32 maps (B, 1, h, w).

    Example:
        >>> maps = GradCAM(model).attribute(images, target=labels)  # (B, 1, h, w)
        >>> signed = GradCAM(model, layer=model.blocks[-2].norm1, relu=False).attribute(images)
    """

    cost = "forward + backward to the chosen layer (default blocks[-1].norm1)"

    def __init__(
        self,
        model: nn.Module,
        layer: int | nn.Module = -1,
        relu: bool = True,
        **anatomy_overrides,
    ) -> None:
        super().__init__(model, **anatomy_overrides)
        self.layer = self._resolve_layer(layer)
        self.relu = bool(relu)

    def _resolve_layer(self, layer: int | nn.Module) -> nn.Module:
        if isinstance(layer, nn.Module):
            if not any(module is layer for module in self.model.modules()):
                raise ValueError(
                    f"layer {type(layer).__name__} is not a submodule of "
                    f"{type(self.model).__name__}; pass e.g. model.blocks[-1].norm1"
                )
            return layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be a block index or an nn.Module, got {layer!r}")
        index = self.anatomy.resolve_layers(layer)[0]
        norms = self.anatomy.pre_attention_norms
        if norms is None or not isinstance(norms[index], nn.Module):
            raise UnsupportedModelError(
                f"block {layer} ({type(self.anatomy.blocks[index]).__name__}) has no known norm "
                "before attention; pass the module to explain as layer=..."
            )
        return norms[index]

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        relu: bool | None = None,
        upsample: bool = False,
        max_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Grad-CAM maps.

        Args:
            inputs: Normalised images (B, C, H, W).
            target: ``None`` (predicted class), int, list of ints or 1-D int tensor.
            relu: Overrides the constructor's choice.
            upsample: Return maps bilinearly upsampled to the input size (H, W).
            max_batch_size: Images per forward/backward pass.

        Returns:
            float32 maps (B, 1, h, w).
        """
        return self._attribute_batched(
            inputs,
            target,
            upsample,
            max_batch_size,
            relu=self.relu if relu is None else bool(relu),
        )

    def _attribute(
        self,
        inputs: torch.Tensor,
        target: torch.Tensor | None,
        grid: tuple[int, int],
        *,
        relu: bool,
    ) -> torch.Tensor:
        prefix = self.anatomy.num_prefix_tokens
        view = _TokenGrid()

        def as_grid(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            grid_out = self.anatomy.channels_last and getattr(output, "ndim", 0) == 4
            if not isinstance(output, torch.Tensor) or (output.dim() != 3 and not grid_out):
                raise TypeError(
                    f"GradCAM's layer must output tokens (B, N, D) (or, for Swin, a "
                    f"channels-last grid (B, h, w, D)), got {type(output).__name__} "
                    f"{tuple(getattr(output, 'shape', ()))}"
                )
            if grid_out:  # timm Swin: (B, h, w, D) is already the grid; the gradient stops here
                return view(output.detach().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            tokens = output.detach()  # the gradient stops here
            batch, count, width = tokens.shape
            image = tokens[:, prefix:].transpose(1, 2).reshape(batch * width, count - prefix)
            image = view(tokens_to_grid(image, grid).reshape(batch, width, *grid))
            return torch.cat([tokens[:, :prefix], image.flatten(2).transpose(1, 2)], 1)

        handle = self.layer.register_forward_hook(as_grid)
        try:
            with self.anatomy.capture():  # eval mode, restored afterwards
                forward = functools.partial(_target_scores, self.anatomy.forward)
                cam = LayerGradCam(forward, view).attribute(
                    inputs.detach(), additional_forward_args=(target,), relu_attributions=relu
                )
        finally:
            handle.remove()
        return cam.detach()
