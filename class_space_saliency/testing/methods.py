"""Building any registered method for a test, also those built from fitted parameters.

``create_method(name, model)`` builds every method whose options all have defaults. A method
registered with ``needs_fitting=True`` (``linear_probe``) needs parameters fitted on the
model's token states; :data:`FITTED_ARGUMENTS` says how a test gets them, and
:func:`build_method` is ``create_method`` with them, so that tests that loop over the
registry run every method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..analysis import linear_probes
from ..anatomy import ViTAnatomy
from ..methods import SaliencyMethod, create_method, method_info
from ..probing import POOLED, LinearProbes


def fitted_probes(model: nn.Module, images_per_class: int = 2) -> LinearProbes:
    """Residual ridge probes of every block, token position and pooled, for ``model``.

    Fitted on seeded standard-normal images of the model's input size (8 x 8 patches for
    dynamic-size models), ``images_per_class`` per class: cheap and deterministic.

    Raises:
        UnsupportedModelError: For models without a ViT anatomy.
    """
    anatomy = ViTAnatomy.from_model(model)
    size = anatomy.img_size or tuple(8 * side for side in anatomy.patch_size)
    count = images_per_class * anatomy.num_classes
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, anatomy.in_chans or 3, *size, generator=generator)
    labels = torch.arange(count) % anatomy.num_classes
    device = next(model.parameters()).device
    data = (images.to(device), labels.to(device))
    return linear_probes(
        model, data, data, components="residual", curve=None, progress=False
    ).probes


def _linear_probe_arguments(model: nn.Module) -> dict[str, Any]:
    # per-token probes fit one token count: dynamic-size models read the pooled probe
    dynamic = ViTAnatomy.from_model(model).img_size is None
    return dict(probes=fitted_probes(model), position=POOLED if dynamic else "per_token")


FITTED_ARGUMENTS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "linear_probe": _linear_probe_arguments,
}
"""Constructor arguments of each ``needs_fitting`` method for a model, by registry name."""


def method_arguments(name: str, model: nn.Module) -> dict[str, Any]:
    """What ``create_method(name, model)`` needs beyond defaults (``{}`` for most methods).

    Raises:
        KeyError: For a ``needs_fitting`` method missing from :data:`FITTED_ARGUMENTS`.
    """
    if not method_info(name).needs_fitting:
        return {}
    method = method_info(name).variant_of or name
    if method not in FITTED_ARGUMENTS:
        raise KeyError(
            f"method {name!r} needs fitting: add how to fit it to "
            "class_space_saliency.testing.FITTED_ARGUMENTS"
        )
    return FITTED_ARGUMENTS[method](model)


def build_method(name: str, model: nn.Module, **options: Any) -> SaliencyMethod:
    """``create_method(name, model, **options)``, with fitted arguments where needed.

    Example:
        >>> from class_space_saliency.testing import build_method, tiny_images, tiny_vit
        >>> explainer = build_method("linear_probe", tiny_vit("plain"))
        >>> explainer.attribute(tiny_images("plain"), target=[0, 1, 2]).shape
        torch.Size([3, 1, 4, 4])
    """
    return create_method(name, model, **{**method_arguments(name, model), **options})
