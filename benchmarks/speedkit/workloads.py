"""The measured models, inputs and calls."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from captum.attr import LayerGradCam
from torch import nn

from class_space_saliency.data import load_default_eval
from class_space_saliency.evaluation import PerturbationProtocol
from class_space_saliency.methods import create_method, list_methods
from class_space_saliency.models import load_default

CAPTUM = "captum_layergradcam"
"""Captum's ``LayerGradCam`` on the layer the package's Grad-CAM explains."""

VARIANTS: dict[str, tuple[str, dict]] = {
    "class_space": ("class_space", {"layer": -1}),
    "class_space_all": ("class_space", {"layer": "all"}),
}
"""Measured class-space configurations: name -> (registry name, constructor options)."""

MEASUREMENTS = (
    "forward",
    *VARIANTS,
    *(name for name in list_methods(variants=False, needs_fitting=False) if name != "class_space"),
    CAPTUM,
)
"""Every measured call; ``forward`` (plain, under ``torch.no_grad()``) is the reference."""

NEEDS_GRAD = frozenset({*list_methods(needs_gradients=True), CAPTUM})
"""Measurements that take gradients; every other one runs under ``torch.no_grad()``."""

PIXEL_STEPS = "vilas2023 as pixel steps"
"""vilas2023's curves with pixel deletion (black) at the same steps, for the cost ratio."""


@dataclass
class Workload:
    """A model in eval mode with its inputs, targets and normalisation."""

    model: nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to(self, device: str | torch.device) -> Workload:
        """The same workload on ``device`` (the model is moved in place)."""
        return dataclasses.replace(
            self,
            model=self.model.to(device),
            images=self.images.to(device),
            targets=self.targets.to(device),
        )


def load_workload(name: str, count: int) -> Workload:
    """The model ``name`` with ``count`` inputs and targets.

    Args:
        name: ``"default"`` (the embedded model on the first ``count`` images of its
            evaluation subset, with their labels) or a timm model name (random weights,
            standard-normal inputs of its input size, random targets; seeded).
        count: Number of inputs (the largest batch size).

    Returns:
        The workload, on the CPU.

    Example:
        >>> load_workload("default", 8).images.shape
        torch.Size([8, 3, 32, 32])
    """
    torch.manual_seed(0)
    if name == "default":
        model, preprocessing = load_default()
        images, labels = load_default_eval(count, preprocessing=preprocessing)
        return Workload(model, images, labels, preprocessing.mean, preprocessing.std)
    model = timm.create_model(name, pretrained=False).eval()
    config = timm.data.resolve_data_config({}, model=model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, *config["input_size"], generator=generator)
    targets = torch.randint(model.num_classes, (count,), generator=generator)
    return Workload(model, images, targets, tuple(config["mean"]), tuple(config["std"]))


def make_call(
    name: str,
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    dtype: str = "fp32",
) -> Callable[[], torch.Tensor]:
    """A no-argument call that runs one measurement on one batch.

    Args:
        name: One of :data:`MEASUREMENTS`.
        model: The model (eval mode).
        images: The batch.
        targets: Class per image (ignored by ``forward``).
        dtype: ``"fp32"``, or ``"bf16"`` to run under autocast on the images' device.

    Returns:
        The call; it returns the logits or maps.

    Example:
        >>> maps = make_call("class_space_all", model, images, labels)()
    """
    if name == "forward":
        run = functools.partial(model, images)
    elif name == CAPTUM:
        layer = create_method("gradcam", model).layer
        run = functools.partial(LayerGradCam(model, layer).attribute, images, target=targets)
    else:
        method, options = VARIANTS.get(name, (name, {}))
        explainer = create_method(method, model, **options)
        run = functools.partial(explainer.attribute, images, target=targets)

    def call() -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            if name not in NEEDS_GRAD:
                stack.enter_context(torch.no_grad())
            if dtype == "bf16":
                stack.enter_context(torch.autocast(images.device.type, dtype=torch.bfloat16))
            return run()

    return call


def as_pixel_steps(protocol: PerturbationProtocol, num_tokens: int) -> PerturbationProtocol:
    """A token-removal protocol redone with black pixel deletion at the same step count.

    Args:
        protocol: A token protocol with ``steps=None`` (every count 1 … N-1).
        num_tokens: Image tokens N of the model's input.

    Returns:
        The pixel protocol with the N-1 fractions ``k / N``.

    Example:
        >>> as_pixel_steps(PRESETS["vilas2023"][0], 4).steps
        (0.25, 0.5, 0.75)
    """
    return dataclasses.replace(
        protocol,
        name=f"{protocol.name}-pixels",
        unit="pixel",
        baseline="black",
        steps=tuple(k / num_tokens for k in range(1, num_tokens)),
    )
