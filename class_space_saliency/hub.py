"""Loading hub models: Hugging Face image classifiers (``load_model("hf:ORG/NAME")``) and
open_clip zero-shot classifiers (``load_model("open_clip:ARCH:TAG", prompts=...)``).

Kept apart from :mod:`.models` so that ``transformers`` and ``open_clip_torch`` stay optional
extras (``pip install class-space-saliency[hf]`` / ``[clip]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .preprocessing import Preprocessing


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
        >>> # (skipped: downloads the model from the Hugging Face hub)
        >>> model, prep = load_hf("facebook/deit-tiny-patch16-224")  # doctest: +SKIP
    """
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


def load_open_clip(
    spec: str,
    prompts: Sequence[str] | None,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
):
    """An open_clip model as a zero-shot classifier over ``prompts``, with its preprocessing.

    Args:
        spec: ``"ARCH"`` or ``"ARCH:TAG"`` (``load_model`` strips ``open_clip:``), e.g.
            ``"ViT-B-32:laion2b_s34b_b79k"``; the tag's weights download (needs the network).
        prompts: The classes, one text prompt each (at least two).
        weights: A local open_clip checkpoint instead of a tag.
        device: Where to put the model.

    Returns:
        ``(zero-shot classifier in eval mode, Preprocessing)`` whose class names are the
        prompts (see :func:`~class_space_saliency.models.zero_shot_clip`).

    Raises:
        ImportError: If ``open_clip_torch`` is not installed.
        ValueError: For fewer than two prompts, an unknown architecture, or neither a tag
            nor ``weights``.
        RuntimeError: If the weights cannot be fetched or read.

    Example:
        >>> # (skipped: downloads OpenAI's CLIP weights)
        >>> model, prep = load_open_clip(  # doctest: +SKIP
        ...     "ViT-B-32:openai", ["a photo of a cat", "a dog"])
    """
    from .clip import zero_shot_clip

    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "'open_clip:' models need open_clip_torch: pip install class-space-saliency[clip]"
        ) from error
    if prompts is None or isinstance(prompts, str) or len(prompts) < 2:
        raise ValueError(f"prompts must be two or more text prompts (the classes), got {prompts!r}")
    arch, _, tag = spec.partition(":")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    pretrained = str(weights) if weights is not None else tag or None
    if pretrained is None:
        raise ValueError(f"give a pretrained tag (open_clip:{arch}:TAG) or weights=FILE")
    try:
        clip, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except Exception as error:  # network, unknown tags and bad files surface as many types
        raise RuntimeError(
            f"could not load open_clip {spec!r} with {pretrained!r}: {error}"
        ) from error
    classifier = zero_shot_clip(clip.eval(), open_clip.get_tokenizer(arch), list(prompts))
    visual = clip.visual
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    preprocessing = Preprocessing(
        mean=tuple(visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
        std=tuple(visual.image_std or open_clip.OPENAI_DATASET_STD),
        input_size=(3, *size),
        class_names=tuple(prompts),
        transform=transform,
    )
    return classifier.to(device).eval(), preprocessing
