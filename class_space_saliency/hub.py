"""Loading Hugging Face hub image classifiers (``load_model("hf:ORG/NAME")``).

Kept apart from :mod:`.models` so that ``transformers`` stays an optional extra
(``pip install class-space-saliency[hf]``).
"""

from __future__ import annotations

import torch
from torch import nn


def load_hf(name: str, device: str | torch.device = "cpu"):
    """Load a Hugging Face image classifier and its preprocessing from the hub.

    Args:
        name: Hub id, e.g. ``"google/vit-base-patch16-224"`` (``load_model`` strips ``hf:``).
        device: Where to put the model.

    Returns:
        ``(model in eval mode, Preprocessing)``; the model's forward returns an
        ``ImageClassifierOutput`` whose ``.logits`` every method reads.

    Raises:
        ImportError: If ``transformers`` is not installed.
        RuntimeError: If the model cannot be fetched (offline, unknown id).

    Example:
        >>> model, prep = load_hf("facebook/deit-tiny-patch16-224")
    """
    from .models import Preprocessing

    try:
        from transformers import AutoImageProcessor, AutoModelForImageClassification
    except ImportError as error:
        raise ImportError(
            "loading 'hf:' models needs transformers: pip install class-space-saliency[hf]"
        ) from error
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a Hugging Face model id must be a non-empty string, got {name!r}")
    try:
        model: nn.Module = AutoModelForImageClassification.from_pretrained(name)
        processor = AutoImageProcessor.from_pretrained(name)
    except Exception as error:  # offline, unknown ids and hub errors surface as many types
        raise RuntimeError(
            f"could not load the Hugging Face model {name!r} ({error}); the hub needs the "
            "network, or a local directory saved with save_pretrained()"
        ) from error
    size = processor.size
    height = size.get("height", size.get("shortest_edge", 224))
    width = size.get("width", size.get("shortest_edge", 224))
    labels = model.config.id2label
    preprocessing = Preprocessing(
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        input_size=(int(model.config.num_channels), int(height), int(width)),
        class_names=tuple(labels[i] for i in range(len(labels))) if labels else None,
    )
    return model.to(device).eval(), preprocessing
